"""Malformed requests are INVALID_ARGUMENT naming the field, before the barrier or user
code: nothing is recorded and nothing runs."""

import unittest

import grpc

from treaty_participant._proto import participant_pb2 as pb

from .support import ParticipantTest, uuid7


class ValidationTest(ParticipantTest):
    def assert_invalid(self, call, field):
        with self.assertRaises(grpc.RpcError) as refused:
            call()
        self.assertEqual(refused.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertTrue(refused.exception.details().startswith(f"{field}: "), refused.exception.details())
        return refused.exception.details()

    def test_ids(self):
        c = self.client
        cases = [
            ("", "b", "transaction_id", "transaction_id: must not be empty"),
            ("t", "", "branch_id", "branch_id: must not be empty"),
            ("x" * 65, "b", "transaction_id", "transaction_id: is 65 bytes long; the limit is 64"),
            ("t", "a/b", "branch_id", "branch_id: contains '/'; only letters, digits and . _ : - are allowed"),
            ("t", "é", "branch_id", None),
        ]
        for txn, branch, field, message in cases:
            for call in (lambda: c.prepare(txn, branch), lambda: c.commit(txn, branch, pb.COMMIT_MODE_ONE_PHASE),
                         lambda: c.abort(txn, branch), lambda: c.compensate(txn, branch)):
                with self.subTest(txn=txn, branch=branch):
                    details = self.assert_invalid(call, field)
                    if message:
                        self.assertEqual(details, message)
        self.assertIsNone(self.server.barrier.record("x" * 64, "b"))
        c.prepare("x" * 64, "b" * 64, b"vote=read_only")  # the limits are inclusive

    def test_payloads(self):
        txn = uuid7()
        big = b"x" * (16 * 1024 + 1)
        c = self.client
        for call in (lambda: c.prepare(txn, "b", big), lambda: c.commit(txn, "b", pb.COMMIT_MODE_SAGA_STEP, big),
                     lambda: c.compensate(txn, "b", big)):
            self.assertEqual(self.assert_invalid(call, "payload"), "payload: is 16385 bytes; the limit is 16384")
        self.assertIsNone(self.server.barrier.record(txn, "b"))
        self.assertEqual(c.prepare(txn, "b", b"vote=read_only;" + b"x" * (16 * 1024 - 15)).vote, pb.VOTE_READ_ONLY)

    def test_modes(self):
        for mode in (0, 4, 99):
            with self.subTest(mode=mode):
                details = self.assert_invalid(lambda: self.client.commit(uuid7(), "b", mode), "mode")
                self.assertEqual(details, f"mode: {mode} is not a commit mode")

    def test_coordinator_endpoints(self):
        txn = uuid7()
        for bad in ("127.0.0.1:7420", "ftp://h:1", "http://h", "http://h:80/path", "http://127.1:7420",
                    "http://user@h:1", "http://h:0"):
            with self.subTest(endpoint=bad):
                details = self.assert_invalid(lambda: self.client.prepare(txn, "b", b"", bad), "coordinator_endpoint")
                self.assertIn("is not an endpoint of the form http(s)://host:port", details)
                self.assert_invalid(lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, b"", bad),
                                    "coordinator_endpoint")
        self.assertIsNone(self.server.barrier.record(txn, "b"))
        self.assertEqual(self.client.effects(txn, "b"), [])
        for good in ("http://127.0.0.1:7420", "https://Coordinator.Example.:7420/", "http://[::1]:7420"):
            self.assertEqual(self.client.prepare(uuid7(), "b", b"", good).vote, pb.VOTE_YES)

    def test_traceparent_never_fails_a_call(self):
        for value in ("garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", ""):
            metadata = (("traceparent", value), ("tracestate", "x=1"))
            self.assertEqual(self.client.prepare(uuid7(), "b", b"", metadata=metadata).vote, pb.VOTE_YES)


if __name__ == "__main__":
    unittest.main()
