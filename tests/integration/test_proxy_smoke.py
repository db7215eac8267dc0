from tests.support.harness import make_message


def test_relay_keeps_bytes(make_gateway, next_hop):
    gw = make_gateway()
    raw = make_message(subject="smoke")
    code, text = gw.send(raw)
    assert code == 250, text
    assert "queued as NH1" in text
    assert next_hop.messages[0].data == raw
