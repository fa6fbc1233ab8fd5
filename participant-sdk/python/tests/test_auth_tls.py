"""Who may call: bearer tokens (constant-time, UNAUTHENTICATED), trusted coordinator
endpoints (PERMISSION_DENIED), TLS and mutual-TLS identities, and the refusals of
serve() at start. TLS certificates are made at test time with the openssl command line;
without it the TLS tests are skipped, saying so."""

import pathlib
import shutil
import subprocess
import tempfile
import unittest

import grpc

from treaty_participant import SqliteBarrier, serve
from treaty_participant._proto import coordinator_pb2
from treaty_participant._proto import participant_pb2 as pb
from treaty_participant.conformance import ConformanceParticipant
from treaty_participant.server import ServerTls

from .support import (TOKEN, Client, FakeCoordinator, InProcessParticipant, ParticipantTest, TempDirTest,
                      make_certificates, uuid7, wait_until)

COORDINATOR = "http://127.0.0.1:7420"
NO_OPENSSL = "openssl is not installed: TLS tests skipped (apt-get install openssl to run them)"


class TokenTest(ParticipantTest):
    serve_options = {"accepted_tokens": [TOKEN, "another-token-0123456789"], "trusted_coordinators": [COORDINATOR]}

    def assert_refused(self, code, call):
        with self.assertRaises(grpc.RpcError) as refused:
            call()
        self.assertEqual(refused.exception.code(), code, refused.exception.details())

    def test_calls_without_the_token_are_refused_before_the_barrier(self):
        txn = uuid7()
        for metadata in ((), (("authorization", "Bearer wrong-token"),), (("authorization", "Basic abc"),),
                         (("authorization", "Bearer " + TOKEN[:-1]),), (("authorization", "Bearer "),)):
            with self.subTest(metadata=metadata):
                self.assert_refused(grpc.StatusCode.UNAUTHENTICATED,
                                    lambda: self.client.prepare(txn, "b", b"vote=yes", metadata=metadata))
                self.assert_refused(grpc.StatusCode.UNAUTHENTICATED,
                                    lambda: self.client.abort(txn, "b", metadata=metadata))
                self.assert_refused(grpc.StatusCode.UNAUTHENTICATED,
                                    lambda: self.client.compensate(txn, "b", metadata=metadata))
                self.assert_refused(grpc.StatusCode.UNAUTHENTICATED,
                                    lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, metadata=metadata))
        self.assertIsNone(self.server.barrier.record(txn, "b"))
        # Credentials come before fields: a bad id without a token is UNAUTHENTICATED.
        self.assert_refused(grpc.StatusCode.UNAUTHENTICATED, lambda: self.client.abort("", "b", metadata=()))

    def test_every_configured_token_is_accepted(self):
        for token in (TOKEN, "another-token-0123456789"):
            metadata = (("authorization", f"Bearer {token}"),)
            self.assertEqual(self.client.prepare(uuid7(), "b", b"vote=yes", metadata=metadata).vote, pb.VOTE_YES)

    def test_an_untrusted_coordinator_endpoint_is_refused_before_a_vote(self):
        txn = uuid7()
        self.assert_refused(grpc.StatusCode.PERMISSION_DENIED,
                            lambda: self.client.prepare(txn, "b", b"vote=yes", "http://attacker.test:7420"))
        self.assert_refused(grpc.StatusCode.PERMISSION_DENIED,
                            lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_SAGA_STEP, b"", "http://attacker.test:7420"))
        self.assertIsNone(self.server.barrier.record(txn, "b"))
        # Another spelling of the trusted endpoint is the same endpoint; empty is accepted.
        self.assertEqual(self.client.prepare(txn, "b", b"vote=yes", "HTTP://127.0.0.1:7420/").vote, pb.VOTE_YES)
        self.assertEqual(self.client.prepare(uuid7(), "b", b"vote=yes", "").vote, pb.VOTE_YES)


class ServeRefusalsTest(TempDirTest):
    def barrier(self):
        barrier = SqliteBarrier(str(self.tmp / "p.db"))
        self.addCleanup(barrier.close)
        return barrier

    def test_tokens_require_trusted_coordinators(self):
        with self.assertRaisesRegex(ValueError, "trusted_coordinators: required"):
            serve(ConformanceParticipant(), self.barrier(), accepted_tokens=[TOKEN])

    def test_listening_beyond_loopback_needs_authentication_or_consent(self):
        with self.assertRaisesRegex(ValueError, "refusing to serve on 0.0.0.0:0"):
            serve(ConformanceParticipant(), self.barrier(), "0.0.0.0:0")

    def test_bad_options_are_named(self):
        for options, message in (
            ({"trusted_coordinators": ["127.0.0.1:7420"]}, "trusted_coordinators"),
            ({"accepted_tokens": ["has space"], "trusted_coordinators": [COORDINATOR]}, "accepted_tokens"),
            ({"coordinator_token": "bad\ntoken"}, "coordinator_token"),
            # Without a list it would go to whatever address a Prepare named.
            ({"coordinator_token": "secret-0123456789"}, "coordinator_token: only sent to trusted"),
            # A short token would be guessed.
            ({"accepted_tokens": ["short"], "trusted_coordinators": [COORDINATOR]}, "accepted_tokens: a token must be 16"),
            ({"coordinator_token": "short", "trusted_coordinators": [COORDINATOR]}, "coordinator_token: a token must be 16"),
            ({"barrier_retention_ms": 0}, "barrier_retention_ms"),
            ({"accepted_identities": ["c"], "trusted_coordinators": [COORDINATOR]}, "accepted_identities"),
        ):
            with self.subTest(options=options):
                with self.assertRaisesRegex(ValueError, message):
                    serve(ConformanceParticipant(), self.barrier(), **options)


@unittest.skipIf(shutil.which("openssl") is None, NO_OPENSSL)
class TlsTest(TempDirTest):
    @classmethod
    def setUpClass(cls):
        certs_dir = pathlib.Path(tempfile.mkdtemp(prefix="treaty-py-certs-"))
        cls.addClassCleanup(shutil.rmtree, certs_dir, ignore_errors=True)
        cls.certs = make_certificates(certs_dir)

    def serve_tls(self, **options):
        tls = ServerTls(self.certs["server.pem"], self.certs["server.key"], **options.pop("tls_options", {}))
        server = InProcessParticipant(self.tmp / "participant.db", tls=tls, **options)
        self.addCleanup(server.stop)
        return server

    def client(self, server, **options):
        client = Client(server.target, ca_pem=self.certs["ca.pem"], **options)
        self.addCleanup(client.close)
        return client

    def test_tls_with_a_token(self):
        server = self.serve_tls(accepted_tokens=[TOKEN], trusted_coordinators=[COORDINATOR])
        self.assertEqual(self.client(server, token=TOKEN).prepare(uuid7(), "b", b"vote=yes").vote, pb.VOTE_YES)
        with self.assertRaises(grpc.RpcError) as refused:
            self.client(server).prepare(uuid7(), "b", b"vote=yes")
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        # Cleartext to a TLS server never gets an answer.
        plain = Client(server.target)
        self.addCleanup(plain.close)
        with self.assertRaises(grpc.RpcError):
            plain.participant.Abort(pb.AbortBranchRequest(transaction_id="t", branch_id="b"), timeout=5)

    def test_mutual_tls_identities(self):
        server = self.serve_tls(
            tls_options={"client_ca_pem": self.certs["ca.pem"]},
            accepted_identities=["coordinator.test"],
            trusted_coordinators=[COORDINATOR],
        )
        coordinator = self.client(server, client_cert=(self.certs["coordinator.pem"], self.certs["coordinator.key"]))
        self.assertEqual(coordinator.prepare(uuid7(), "b", b"vote=yes").vote, pb.VOTE_YES)
        stranger = self.client(server, client_cert=(self.certs["stranger.pem"], self.certs["stranger.key"]))
        with self.assertRaises(grpc.RpcError) as refused:
            stranger.prepare(uuid7(), "b", b"vote=yes")
        self.assertEqual(refused.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        # Only DNS and URI SANs and the CN name a peer, as in the Rust SDK: an email or IP
        # SAN that reads like an accepted identity does not (it did).
        for identities in (["coordinator.test"], ["10.9.8.7"]):
            other = self.serve_tls(
                tls_options={"client_ca_pem": self.certs["ca.pem"]},
                accepted_identities=identities,
                trusted_coordinators=[COORDINATOR],
            )
            mailer = self.client(other, client_cert=(self.certs["mailer.pem"], self.certs["mailer.key"]))
            with self.assertRaises(grpc.RpcError) as refused:
                mailer.prepare(uuid7(), "b", b"vote=yes")
            self.assertEqual(refused.exception.code(), grpc.StatusCode.PERMISSION_DENIED, identities)
        # grpcio cannot make a client certificate optional: without one, no connection.
        with self.assertRaises(grpc.RpcError) as anonymous:
            self.client(server).prepare(uuid7(), "b", b"vote=yes")
        self.assertEqual(anonymous.exception.code(), grpc.StatusCode.UNAVAILABLE)
        # A token decides alone, even on a connection with a good certificate.
        with self.assertRaises(grpc.RpcError) as wrong_token:
            coordinator.prepare(uuid7(), "b", b"vote=yes", metadata=(("authorization", "Bearer wrong-token"),))
        self.assertEqual(wrong_token.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_in_doubt_resolution_over_https_verifies_the_coordinator(self):
        fake = FakeCoordinator(tls=(self.certs["server.pem"], self.certs["server.key"]))
        self.addCleanup(fake.stop)
        server = InProcessParticipant(self.tmp / "participant.db", coordinator_ca_pem=self.certs["ca.pem"],
                                      coordinator_token=TOKEN, trusted_coordinators=[fake.endpoint],
                                      in_doubt_interval_ms=50, in_doubt_ask_after_ms=0)
        self.addCleanup(server.stop)
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        fake.decisions[txn] = coordinator_pb2.DECISION_COMMIT
        client.prepare(txn, "b", b"vote=yes", fake.endpoint)
        wait_until(lambda: server.barrier.record(txn, "b").status.value == "committed", what="the commit over TLS")
        self.assertEqual(fake.asked[0][2].get("authorization"), f"Bearer {TOKEN}")

    def test_in_doubt_resolution_refuses_an_unverified_coordinator(self):
        fake = FakeCoordinator(tls=(self.certs["server.pem"], self.certs["server.key"]))
        self.addCleanup(fake.stop)
        # No CA given: the system's roots do not know the test CA, so nothing is asked.
        server = InProcessParticipant(self.tmp / "participant.db", in_doubt_interval_ms=3_600_000,
                                      in_doubt_ask_after_ms=0, in_doubt_call_timeout_ms=2_000)
        self.addCleanup(server.stop)
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        fake.decisions[txn] = coordinator_pb2.DECISION_ABORT
        client.prepare(txn, "b", b"vote=yes", fake.endpoint)
        report = server.handle.resolver.round()
        self.assertEqual((report.committed, report.aborted), (0, 0))
        self.assertEqual(fake.asks_about(txn), 0)
        self.assertEqual(server.barrier.record(txn, "b").status.value, "prepared")

    def test_a_reloaded_certificate_serves_new_connections(self):
        renewed_dir = self.tmp / "renewed"
        renewed_dir.mkdir()
        renewed = make_certificates(renewed_dir)  # another CA: tells the two apart
        server = self.serve_tls()
        old_ca, new_ca = self.certs["ca.pem"], renewed["ca.pem"]

        def answers(ca_pem: bytes) -> bool:
            """Whether a new connection trusting ``ca_pem`` is served (it fails its
            handshake, UNAVAILABLE, otherwise)."""
            client = Client(server.target, ca_pem=ca_pem)
            try:
                client.abort(uuid7(), "b")
                return True
            except grpc.RpcError as error:
                self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE, error)
                return False
            finally:
                client.close()

        self.assertTrue(answers(old_ca))
        self.assertFalse(answers(new_ca))
        # A key that is not the certificate's is refused, and the old pair stays.
        mismatched = ServerTls(renewed["server.pem"], renewed["coordinator.key"])
        with self.assertRaisesRegex(ValueError, "do not load together"):
            server.handle.reload_tls(mismatched)
        with self.assertRaisesRegex(ValueError, "client_ca_pem"):
            server.handle.reload_tls(ServerTls(renewed["server.pem"], renewed["server.key"], renewed["ca.pem"]))
        self.assertTrue(answers(old_ca))
        server.handle.reload_tls(ServerTls(renewed["server.pem"], renewed["server.key"]))
        wait_until(lambda: answers(new_ca), what="a new connection served with the renewed certificate")
        self.assertFalse(answers(old_ca))

    def test_an_encrypted_key_is_refused_without_a_prompt(self):
        # OpenSSL would ask for its pass phrase on the terminal, and wait.
        key = self.tmp / "encrypted.key"
        subprocess.run(["openssl", "pkey", "-aes256", "-passout", "pass:secret", "-out", str(key)],
                       input=self.certs["server.key"], check=True, capture_output=True, timeout=60)
        with self.assertRaisesRegex(ValueError, "encrypted private key"):
            self.serve_tls_with(ServerTls(self.certs["server.pem"], key.read_bytes()))

    def serve_tls_with(self, tls: ServerTls):
        server = InProcessParticipant(self.tmp / "participant.db", tls=tls)
        self.addCleanup(server.stop)
        return server

    def test_a_cleartext_server_has_no_tls_to_reload(self):
        server = InProcessParticipant(self.tmp / "participant.db")
        self.addCleanup(server.stop)
        with self.assertRaisesRegex(ValueError, "cleartext"):
            server.handle.reload_tls(ServerTls(self.certs["server.pem"], self.certs["server.key"]))


if __name__ == "__main__":
    unittest.main()
