"""Decisions: singletons, value equality, reprs."""

from interceptor.engine import ACCEPT, DROP_LOSS, DROP_QUEUE, Accept, Drop, Hold


def test_accept_is_a_singleton_with_a_readable_repr():
    assert isinstance(ACCEPT, Accept)
    assert repr(ACCEPT) == "ACCEPT"


def test_drop_compares_by_reason():
    assert DROP_LOSS == Drop("loss")
    assert DROP_QUEUE == Drop("queue")
    assert DROP_LOSS != DROP_QUEUE
    assert hash(Drop("mtu")) == hash(Drop("mtu"))
    assert repr(Drop("firewall")) == "Drop('firewall')"


def test_hold_compares_by_departure():
    assert Hold(5) == Hold(5)
    assert Hold(5) != Hold(6)
    assert Hold(5) != 5
    assert repr(Hold(7)) == "Hold(7)"


def test_decisions_have_no_instance_dict():
    for decision in (ACCEPT, DROP_LOSS, Hold(1)):
        assert not hasattr(decision, "__dict__")
