"""The agent's hand-written SDS wire format against Envoy's generated protobuf classes."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from smc.agent import InvalidMessage
from smc.agent._wire import SECRET_TYPE, decode_request, encode_secret_response


def test_responses_parse_with_the_generated_classes() -> None:
    chain = "-----BEGIN CERTIFICATE-----\nMIIB" + "x" * 300 + "\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN PRIVATE KEY-----\nMIGH" + "y" * 200 + "\n-----END PRIVATE KEY-----\n"
    raw = encode_secret_response(
        version="0a1b", nonce="7", name="default", chain_pem=chain, key_pem=key
    )
    resp = discovery_pb2.DiscoveryResponse.FromString(raw)
    assert (resp.version_info, resp.nonce, resp.type_url) == ("0a1b", "7", SECRET_TYPE)
    (any_msg,) = resp.resources
    secret = secret_pb2.Secret()
    assert any_msg.Unpack(secret)
    assert secret.name == "default"
    assert secret.tls_certificate.certificate_chain.inline_string == chain
    assert secret.tls_certificate.private_key.inline_string == key
    # the same bytes as the generated encoder
    want = discovery_pb2.DiscoveryResponse(version_info="0a1b", type_url=SECRET_TYPE, nonce="7")
    want.resources.add().Pack(secret)
    assert want.SerializeToString() == raw
    empty = discovery_pb2.DiscoveryResponse.FromString(
        encode_secret_response(version="1", nonce="2", name=None, chain_pem="", key_pem="")
    )
    assert list(empty.resources) == []


def test_requests_from_the_generated_classes_decode() -> None:
    req = discovery_pb2.DiscoveryRequest(
        version_info="v1",
        node=base_pb2.Node(id="shop/web-0", cluster="shop/web"),
        resource_names=["default", "other"],
        type_url=SECRET_TYPE,
        response_nonce="3",
        error_detail=status_pb2.Status(code=3, message="bad certificate"),
    )
    got = decode_request(req.SerializeToString())
    assert got.version_info == "v1" and got.resource_names == ("default", "other")
    assert got.type_url == SECRET_TYPE and got.response_nonce == "3"
    assert got.error == "bad certificate"
    first = decode_request(
        discovery_pb2.DiscoveryRequest(resource_names=["default"]).SerializeToString()
    )
    assert first.error is None and first.response_nonce == ""
    with pytest.raises(InvalidMessage):
        decode_request(b"\x1a\x10abc")  # a field longer than the message
    with pytest.raises(InvalidMessage):
        decode_request(b"\x08\xff")  # a truncated varint
