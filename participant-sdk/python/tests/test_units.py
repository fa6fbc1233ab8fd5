"""Small pure pieces: ids and limits, endpoints in canonical form, transaction age from
UUIDv7 ids, per-key locks. The expected strings are the Rust SDK's."""

import threading
import time
import unittest

from treaty_participant import endpoint
from treaty_participant.keyed_locks import MAX_WAITING_PER_KEY, Busy, KeyedLocks
from treaty_participant.limits import MAX_REASON_BYTES, FieldError, check_id, check_payload, quote_input, truncate_reason
from treaty_participant.transaction_age import first_transaction_id_at, transaction_created_unix_ms


class LimitsTest(unittest.TestCase):
    def test_ids(self):
        check_id("branch_id", "payment-1.a_b:c")
        check_id("branch_id", "x" * 64)
        for bad, message in (("", "branch_id: must not be empty"),
                             ("a/b", "branch_id: contains '/'; only letters, digits and . _ : - are allowed"),
                             ("x" * 65, "branch_id: is 65 bytes long; the limit is 64")):
            with self.assertRaises(FieldError) as error:
                check_id("branch_id", bad)
            self.assertEqual(str(error.exception), message)

    def test_payload_limit_is_inclusive(self):
        check_payload("p", bytes(16384))
        with self.assertRaises(FieldError):
            check_payload("p", bytes(16385))

    def test_reasons_are_cut_on_a_character_boundary(self):
        self.assertEqual(truncate_reason("short"), "short")
        cut = truncate_reason("é" * MAX_REASON_BYTES)
        self.assertLessEqual(len(cut.encode()), MAX_REASON_BYTES)
        self.assertTrue(cut.endswith("…"))

    def test_quoted_input_is_bounded_and_escaped(self):
        self.assertEqual(quote_input("plain"), '"plain"')
        self.assertNotIn("\x1b", quote_input("a\x1b[2J"))
        self.assertTrue(quote_input("é" * 1000).endswith('"… (2000 bytes)'))


class EndpointTest(unittest.TestCase):
    def test_spellings_of_one_target_share_one_canonical_form(self):
        for same in ("http://127.0.0.1:7000", "HTTP://127.0.0.1:7000", "http://127.0.0.1:7000/",
                     "http://[::ffff:127.0.0.1]:7000", "http://[0:0:0:0:0:ffff:7f00:0001]:7000/"):
            self.assertEqual(str(endpoint.parse(same)), "http://127.0.0.1:7000", same)
        for same in ("https://payments.internal:443", "HTTPS://Payments.Internal:443",
                     "https://payments.internal.:443", "https://PAYMENTS.INTERNAL.:443/"):
            self.assertEqual(str(endpoint.parse(same)), "https://payments.internal:443", same)
        for same in ("http://[::1]:7000", "http://[0:0::1]:7000", "http://[0000::0001]:7000"):
            self.assertEqual(str(endpoint.parse(same)), "http://[::1]:7000", same)
        self.assertEqual(endpoint.parse("http://[::1]:7000").target, "[::1]:7000")

    def test_ambiguous_or_malformed_endpoints_are_refused(self):
        for refused in ("", "127.0.0.1:50051", "ftp://host:1", "http://host", "http://:80", "http://host:0",
                        "http://host:99999", "http://host:80/path", "http://user@host:80", "http://127.1:7000",
                        "http://2130706433:7000", "http://0x7f.0.0.1:7000", "http://0177.0.0.1:7000",
                        "http://127.0.0.01:7000", "http://127.0.0.1.:7000", "http://256.0.0.1:7000",
                        "http://127.0.0.1:07000", "http://127.0.0.1:+7000", "http://::1:7000",
                        "http://[::1%eth0]:7000", "http://[::7f00:1]:7000", "http://-a.b:1", "http://a b:1",
                        "http://h:1?x", "http://" + "a" * 300 + ":1"):
            with self.subTest(endpoint=refused), self.assertRaises(endpoint.EndpointError):
                endpoint.parse(refused)

    def test_field_errors_quote_the_input_escaped(self):
        with self.assertRaises(FieldError) as error:
            endpoint.parse_field("coordinator_endpoint", "http://a\x1b[2J:1")
        message = str(error.exception)
        self.assertTrue(message.startswith('coordinator_endpoint: "http://a\\u{1b}[2J:1" is not an endpoint'))
        self.assertNotIn("\x1b", message)
        with self.assertRaises(FieldError) as error:
            endpoint.parse_field("e", "x" * 257)
        self.assertEqual(str(error.exception), "e: is 257 bytes long; the limit is 256")


class TransactionAgeTest(unittest.TestCase):
    def test_reads_the_millisecond_of_a_canonical_uuidv7(self):
        self.assertEqual(transaction_created_unix_ms("01900000-0000-7abc-9def-0123456789ab"), 0x019000000000)
        self.assertEqual(transaction_created_unix_ms(first_transaction_id_at(1_700_000_000_123)), 1_700_000_000_123)

    def test_any_other_id_has_no_age(self):
        for other in ("t1", "conformance-1", "01900000-0000-7ABC-9DEF-0123456789AB",
                      "01900000-0000-4abc-9def-0123456789ab", "01900000-0000-7abc-1def-0123456789ab",
                      "0190000000007abc9def0123456789ab", "01900000-0000-7abc-9def-0123456789abc"):
            self.assertIsNone(transaction_created_unix_ms(other), other)

    def test_ids_sort_by_their_millisecond(self):
        at = 1_700_000_000_000
        first = first_transaction_id_at(at)
        before = "018bcfe5-67ff-7fff-bfff-ffffffffffff"
        self.assertEqual(transaction_created_unix_ms(before), at - 1)
        self.assertLess(before, first)
        self.assertGreater("018bcfe5-6800-7000-8000-000000000001", first)


class KeyedLocksTest(unittest.TestCase):
    def test_one_holder_per_key_and_no_entry_left_behind(self):
        locks = KeyedLocks()
        inside, most = [0], [0]
        guard = threading.Lock()

        def work():
            for _ in range(50):
                with locks.hold("k"):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    with guard:
                        inside[0] -= 1

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(most[0], 1)
        self.assertEqual(len(locks), 0)
        with locks.hold("a"), locks.hold("b", blocking=False) as taken:
            self.assertTrue(taken)

    def test_waiting_is_bounded_in_number_and_by_the_timeout(self):
        locks = KeyedLocks()
        waiting = []

        def wait():
            with locks.hold("k"):
                pass

        with locks.hold("k"):
            for _ in range(MAX_WAITING_PER_KEY):
                thread = threading.Thread(target=wait)
                thread.start()
                waiting.append(thread)
            deadline = time.monotonic() + 30
            while locks.users("k") < MAX_WAITING_PER_KEY + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            # One more is refused at once, and a try without waiting is not taken.
            with self.assertRaises(Busy):
                with locks.hold("k"):
                    pass
            with locks.hold("k", blocking=False) as taken:
                self.assertFalse(taken)
        for thread in waiting:
            thread.join(30)
        self.assertEqual(len(locks), 0)
        # A wait with a timeout gives up when it passes, and leaves no entry behind.
        with locks.hold("k"):
            done = []

            def wait_briefly():
                try:
                    with locks.hold("k", timeout_s=0.05):
                        done.append("taken")
                except Busy:
                    done.append("busy")

            thread = threading.Thread(target=wait_briefly)
            thread.start()
            thread.join(30)
            self.assertEqual(done, ["busy"])
        self.assertEqual(len(locks), 0)
        # A call without a deadline has centuries left, by grpc: no deadline at all.
        with locks.hold("k", timeout_s=1e12) as taken:
            self.assertTrue(taken)
        with locks.hold("k"):
            waited = []

            def wait_without_deadline():
                with locks.hold("k", timeout_s=1e12):
                    waited.append("taken")

            thread = threading.Thread(target=wait_without_deadline)
            thread.start()
            time.sleep(0.1)
        thread.join(30)
        self.assertEqual(waited, ["taken"])


if __name__ == "__main__":
    unittest.main()
