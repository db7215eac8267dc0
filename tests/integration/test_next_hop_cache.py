"""The next-hop connection cache (gateway/relay.py ``ConnectionCache``), against
a real next hop on loopback: sessions share an idle connection, a connection
with a transaction open is never reused, one the next hop dropped is replaced
without the client hearing of it, idle ones are QUIT on time and at stop."""

from __future__ import annotations

import email
import smtplib
import threading

from tests.support.harness import NextHop, make_message


def _subjects(messages) -> list[str]:
    return [email.message_from_bytes(m.data)["Subject"] for m in messages]


def _partial_session(gw, *, rset: bool) -> None:
    """MAIL and RCPT, then RSET (transaction ended) or not, then QUIT."""
    with gw.smtp() as s:
        s.ehlo("client.test")
        assert s.mail("a@ext.test")[0] == 250
        assert s.rcpt("b@example.com")[0] == 250
        if rset:
            assert s.rset()[0] == 250


def test_sessions_share_one_next_hop_connection(make_gateway, next_hop):
    gw = make_gateway()
    for i in range(3):
        code, _ = gw.send(make_message(subject=f"m{i}"), xforward={"ADDR": f"192.0.2.{i + 1}"})
        assert code == 250
    got = next_hop.wait_for(3)
    assert [m.xforward.get("ADDR") for m in got] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert next_hop.connections == 1 and next_hop.quits == 0
    assert gw.server.next_hop_cache.reused == 2


def test_connection_dropped_while_idle_is_replaced(make_gateway, next_hop):
    gw = make_gateway()
    assert gw.send(make_message(subject="first"))[0] == 250
    next_hop.drop()  # next hop restarted / timed the idle connection out
    code, text = gw.send(make_message(subject="second"))
    assert code == 250, text
    assert _subjects(next_hop.wait_for(2)) == ["first", "second"]
    assert next_hop.connections == 2


def test_421_on_a_reused_connection_is_retried_on_a_new_one(make_gateway, next_hop):
    gw = make_gateway()
    assert gw.send(make_message(subject="first"))[0] == 250
    next_hop.mail_reply_once = "421 4.3.2 service shutting down"
    code, text = gw.send(make_message(subject="second"))
    assert code == 250, text
    assert len(next_hop.wait_for(2)) == 2
    assert next_hop.connections == 2


def test_several_cached_connections_gone_bad_cost_one_retry(make_gateway, next_hop):
    """Two idle connections, both refusing now: the retry opens a new one
    instead of trying the other cached one."""
    gw = make_gateway()
    first, second = gw.smtp(), gw.smtp()
    for s in (first, second):  # two sessions at once: two next-hop connections
        s.ehlo("client.test")
        assert s.mail("a@ext.test")[0] == 250
    for s in (first, second):
        assert s.rset()[0] == 250
        s.quit()
    # QUIT is answered after the session left its connection in the cache
    assert gw.server.next_hop_cache.idle_count() == 2
    next_hop.doom()
    code, text = gw.send(make_message(subject="after"))
    assert code == 250, text
    assert _subjects(next_hop.wait_for(1)) == ["after"]
    assert next_hop.connections == 3


def test_421_on_a_new_connection_reaches_the_client_as_451(make_gateway, next_hop):
    gw = make_gateway(gateway={"next_hop_cache_time": 0})
    next_hop.mail_reply_once = "421 4.3.2 service shutting down"
    code, _ = gw.send(make_message())
    assert code == 451
    assert next_hop.messages == []


def test_open_transaction_is_not_reused(make_gateway, next_hop):
    gw = make_gateway()
    _partial_session(gw, rset=False)  # QUIT with MAIL and RCPT open at the next hop
    next_hop.wait_until(lambda: next_hop.quits == 1, "QUIT from the gateway")
    assert gw.send(make_message())[0] == 250
    assert next_hop.connections == 2


def test_client_vanishing_mid_transaction_closes_the_connection(make_gateway, next_hop):
    gw = make_gateway()
    s = gw.smtp()
    s.ehlo("client.test")
    assert s.mail("a@ext.test")[0] == 250
    assert s.rcpt("b@example.com")[0] == 250
    s.close()  # no QUIT, no RSET
    next_hop.wait_until(lambda: not next_hop.live, "connection closed by the gateway")
    assert gw.send(make_message())[0] == 250
    assert next_hop.connections == 2


def test_ended_transaction_is_reused(make_gateway, next_hop):
    gw = make_gateway()
    _partial_session(gw, rset=True)
    assert gw.send(make_message())[0] == 250
    assert next_hop.connections == 1


def test_refused_message_leaves_a_reusable_connection(make_gateway, next_hop):
    gw = make_gateway()
    next_hop.data_reply = "554 5.7.1 no thanks"
    assert gw.send(make_message())[0] == 554
    next_hop.data_reply = None
    assert gw.send(make_message())[0] == 250
    assert next_hop.connections == 1


def test_idle_connections_are_quit_after_the_cache_time(make_gateway, next_hop):
    gw = make_gateway(gateway={"next_hop_cache_time": 0.2})
    assert gw.send(make_message())[0] == 250
    next_hop.wait_until(lambda: next_hop.quits == 1 and not next_hop.live, "idle connection QUIT")
    assert gw.send(make_message())[0] == 250
    assert next_hop.connections == 2


def test_cache_time_zero_means_a_connection_per_session(make_gateway, next_hop):
    gw = make_gateway(gateway={"next_hop_cache_time": 0})
    for _ in range(2):
        assert gw.send(make_message())[0] == 250
    next_hop.wait_until(lambda: next_hop.quits == 2, "a QUIT per session")
    assert next_hop.connections == 2


def test_stop_quits_the_idle_connections(make_gateway, next_hop):
    gw = make_gateway()
    assert gw.send(make_message())[0] == 250
    assert next_hop.quits == 0
    gw.stop()
    next_hop.wait_until(lambda: next_hop.quits == 1 and not next_hop.live, "QUIT at stop")


def test_reload_to_another_next_hop_never_reuses_the_old_one(make_gateway, next_hop, tmp_path):
    from tests.support.harness import test_config

    gw = make_gateway()
    assert gw.send(make_message(subject="to one"))[0] == 250
    other = NextHop()
    try:
        gw.reload(test_config(tmp_path, other.address))
        assert gw.send(make_message(subject="to two"))[0] == 250
        assert _subjects(other.wait_for(1)) == ["to two"]
        assert len(next_hop.messages) == 1
    finally:
        other.stop()


def test_concurrent_sessions_deliver_everything(make_gateway, next_hop):
    gw = make_gateway()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(5):
                code, text = gw.send(make_message(subject=f"w{n}-{i}"))
                assert code == 250, text
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    got = next_hop.wait_for(30)
    assert sorted(_subjects(got)) == sorted(f"w{n}-{i}" for n in range(6) for i in range(5))
    # At most one connection per concurrent session, fewer than one per session.
    assert next_hop.connections <= 6 < 30


def test_next_hop_down_still_gives_451(make_gateway, next_hop):
    gw = make_gateway()
    assert gw.send(make_message())[0] == 250
    next_hop.stop_listening()  # and its open connections
    code, _ = gw.send(make_message())
    assert code == 451
    try:
        with gw.smtp() as s:
            s.ehlo("client.test")
            assert s.mail("a@ext.test")[0] == 451
    except smtplib.SMTPServerDisconnected:
        raise AssertionError("the gateway closed the client session") from None
