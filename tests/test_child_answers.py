"""How the supervisor reads one answer from a child's internal admin endpoint (proxy/runtime/children.py)."""

from mlmirror.runtime.children import parse_answer


def test_a_whole_answer_gives_its_status_and_body():
    body = b'{"routes": []}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert parse_answer(answer) == (200, body)


def test_an_answer_cut_short_by_a_dying_child_is_no_answer():
    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 400\r\nConnection: close\r\n\r\n{"routes": [{"na'
    code, reason = parse_answer(answer)
    assert code == 0
    assert b"cut short" in reason
    assert b"400" in reason


def test_nothing_or_garbage_is_a_malformed_answer():
    assert parse_answer(b"") == (0, b"malformed answer")
    assert parse_answer(b"HTTP/1.1 abc\r\n\r\n") == (0, b"malformed answer")


def test_an_answer_without_a_length_is_taken_as_read():
    assert parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready") == (503, b"not ready")
