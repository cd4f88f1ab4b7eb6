//! Every message that crosses from one node to another, in one place.
//!
//! Two layers travel between nodes:
//! - **Tunnel frames** ([`Frame`]) carry a ractor_cluster session over core NATS (see
//!   [`crate::tunnel`]), opened by an [`OpenRequest`] / [`OpenReply`] exchange.
//! - **Remote actor messages** ([`NodeControlRequest`], [`GpuControlRequest`] and their replies)
//!   are what one node's actors send to another's through that session.
//!
//! All are serde types encoded with [postcard] (1.x) behind their wire version: the version is
//! written first, as its own varint, and read before anything else, so a peer speaking another
//! [`WIRE_VERSION`] is refused with a clear code at the opening request instead of having its
//! bytes misread. Changing any type here means bumping [`WIRE_VERSION`].
//!
//! Version 1 was bincode 2 (unmaintained, RUSTSEC-2025-0141); version 2 is postcard. Both write
//! a small `u16` as the same single byte and both write strings as a varint length then the
//! bytes, so a version-1 `OpenRequest` would decode as a version-2 one if the version were not
//! checked first: it is, and such a peer gets `RefusalCode::Version` ("a peer speaks wire
//! version 1, this node 2").
//!
//! postcard is not self-describing: it cannot carry `#[serde(flatten)]`, untagged enums or
//! types read through `deserialize_any` (`serde_json::Value`). No type here has one; a field
//! that ever needs such a type must travel as JSON text in a `String` field, said so where it is.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version of every type in this module (1: bincode 2; 2: postcard).
pub const WIRE_VERSION: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot decode a cross-node message: {0}")]
    Decode(String),
    #[error("a peer speaks wire version {got}, this node {WIRE_VERSION}")]
    Version { got: u16 },
}

/// A value with the wire version it was written in: the version first, then the body (postcard
/// writes a struct's fields in order, so this is `varint(version) ++ body`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub version: u16,
    pub body: T,
}

/// Encodes `body` in the current wire version.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    postcard::to_stdvec(&Versioned { version: WIRE_VERSION, body }).expect("wire types always encode")
}

/// Decodes a value written by [`encode`]: the version first (another one is refused before
/// its body is read), then the body, refusing trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (version, body): (u16, &[u8]) = postcard::take_from_bytes(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if version != WIRE_VERSION {
        return Err(WireError::Version { got: version });
    }
    let (value, rest): (T, &[u8]) = postcard::take_from_bytes(body).map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Tunnel

/// Asks a node to accept a tunnel (request/reply on `kiln.tunnel.open.<acceptor>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenRequest {
    /// Random, unique per attempt; names the two frame subjects of the session.
    pub session: String,
    pub dialer: String,
    pub acceptor: String,
    /// `sha256(cookie, session, dialer, acceptor)`: a peer with another cookie is refused here,
    /// with a clear code, before ractor_cluster's own challenge would refuse it too.
    pub proof: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum OpenReply {
    Accepted,
    Refused { code: RefusalCode, message: String },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RefusalCode {
    /// The cluster cookies differ.
    CookieMismatch,
    /// The request was addressed to another node, or came from this node's own name.
    WrongName,
    /// The acceptor already has a live session with a node of the dialer's name: either a
    /// duplicate process or a session that is not yet known to be dead (retry later).
    AlreadyConnected,
    /// The acceptor is shutting down.
    Leaving,
    /// Another wire version (only in the reply to an undecodable request).
    Version,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::CookieMismatch => "cookie_mismatch",
            RefusalCode::WrongName => "wrong_name",
            RefusalCode::AlreadyConnected => "already_connected",
            RefusalCode::Leaving => "leaving",
            RefusalCode::Version => "wire_version",
        }
    }
}

/// The proof of the cookie carried by an [`OpenRequest`].
pub fn cookie_proof(cookie: &str, session: &str, dialer: &str, acceptor: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in ["kiln-tunnel-v1", cookie, session, dialer, acceptor] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// One frame of a tunnel. Every frame, whatever its kind, carries the next sequence number of
/// its direction, so a lost or repeated core-NATS message is seen at once and closes the
/// session (ractor_cluster cannot resynchronise a byte stream with a hole in it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Frame {
    pub seq: u64,
    /// Data bytes of the other direction this side has handed to its ractor session so far:
    /// the sender's flow-control credit.
    pub consumed: u64,
    pub kind: FrameKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FrameKind {
    Data(#[serde(with = "serde_bytes_compat")] Vec<u8>),
    /// Nothing to send, but alive (and here is my `consumed`).
    Heartbeat,
    /// The session is over; the reason is for the peer's log.
    Close(String),
}

/// Serde's default for `Vec<u8>` is a sequence of `u8`s; this writes it as one byte string
/// (postcard: a varint length and the bytes, read back without a per-element visit).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Remote actor messages

/// What one node asks another's [`crate::node_control::NodeControl`] actor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum NodeControlRequest {
    /// Answers at once: measures the actor path.
    Ping,
    /// Stop the job if it runs here (its record is already flagged `cancel_requested`).
    CancelJob { job_id: String },
    /// Stop pulling, finish running jobs, leave the registry, exit.
    Drain,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum NodeControlReply {
    Pong {
        node: String,
    },
    /// Whether a job of that id was running on this node.
    Cancelled {
        node: String,
        was_running: bool,
    },
    Draining {
        node: String,
    },
}

/// What a node asks a GPU supervisor anywhere in the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum GpuControlRequest {
    /// Stop the slot's inference actor (its running job is retried); the supervisor starts a
    /// fresh one, subject to its restart budget.
    Restart,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum GpuControlReply {
    Restarting {
        node: String,
        slot: String,
    },
    /// The slot is quarantined or stopping: nothing to restart.
    NotRunning {
        node: String,
        slot: String,
    },
}

/// Process groups, synchronised across the cluster by ractor_cluster.
pub mod groups {
    /// Every node's control actor.
    pub const NODES: &str = "kiln.nodes";
    /// Every GPU supervisor of every node.
    pub const GPUS: &str = "kiln.gpus";
    /// Every stage worker of every node (local messages only: for discovery and
    /// counting, not remote calls).
    pub const COMPRESSORS: &str = "kiln.compressors";

    /// The control actor of one node (one member).
    pub fn node(node: &str) -> String {
        format!("kiln.node.{node}")
    }
    /// The supervisor of one slot of one node (one member).
    pub fn gpu(node: &str, slot: &str) -> String {
        format!("kiln.gpu.{node}.{slot}")
    }
}

/// Implements `ractor::Message` for an actor's message enum so that exactly one variant,
/// `$variant(request, RpcReplyPort<reply>)`, can be called on a remote node; every other
/// variant stays local (sending it to a remote actor is refused by ractor).
#[macro_export]
macro_rules! remote_call_message {
    ($msg:ty, $variant:ident, $req:ty, $reply:ty) => {
        impl ractor::Message for $msg {
            fn serializable() -> bool {
                true
            }

            #[allow(unreachable_patterns)]
            fn serialize(self) -> Result<ractor::message::SerializedMessage, ractor::message::BoxedDowncastErr> {
                match self {
                    Self::$variant(request, reply) => {
                        let timeout = reply.get_timeout();
                        let (tx, rx) = ractor::concurrency::oneshot::<Vec<u8>>();
                        // The reply comes back as bytes; decode it for the typed port.
                        ::kiln_core::task::spawn(::kiln_core::task::TaskKind::Reply, "remote reply decoding", async move {
                            let bytes = match timeout {
                                Some(t) => tokio::time::timeout(t, rx).await.ok().and_then(|r| r.ok()),
                                None => rx.await.ok(),
                            };
                            if let Some(bytes) = bytes {
                                match $crate::wire::decode::<$reply>(&bytes) {
                                    Ok(typed) => {
                                        let _ = reply.send(typed);
                                    }
                                    Err(e) => tracing::warn!(error = %e, "undecodable remote reply dropped"),
                                }
                            }
                        });
                        let port: ractor::RpcReplyPort<Vec<u8>> = match timeout {
                            Some(t) => (tx, t).into(),
                            None => tx.into(),
                        };
                        Ok(ractor::message::SerializedMessage::Call {
                            variant: stringify!($variant).to_string(),
                            args: $crate::wire::encode(&request),
                            reply: port,
                            metadata: None,
                        })
                    }
                    _ => Err(ractor::message::BoxedDowncastErr),
                }
            }

            fn deserialize(m: ractor::message::SerializedMessage) -> Result<Self, ractor::message::BoxedDowncastErr> {
                match m {
                    ractor::message::SerializedMessage::Call { variant, args, reply, .. } if variant == stringify!($variant) => {
                        let request: $req = $crate::wire::decode(&args).map_err(|e| {
                            tracing::warn!(error = %e, "undecodable remote call refused");
                            ractor::message::BoxedDowncastErr
                        })?;
                        let timeout = reply.get_timeout();
                        let (tx, rx) = ractor::concurrency::oneshot::<$reply>();
                        ::kiln_core::task::spawn(::kiln_core::task::TaskKind::Reply, "remote reply encoding", async move {
                            let typed = match timeout {
                                Some(t) => tokio::time::timeout(t, rx).await.ok().and_then(|r| r.ok()),
                                None => rx.await.ok(),
                            };
                            if let Some(typed) = typed {
                                let _ = reply.send($crate::wire::encode(&typed));
                            }
                        });
                        let port: ractor::RpcReplyPort<$reply> = match timeout {
                            Some(t) => (tx, t).into(),
                            None => tx.into(),
                        };
                        Ok(Self::$variant(request, port))
                    }
                    _ => Err(ractor::message::BoxedDowncastErr),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_data_is_compact() {
        let f = Frame { seq: 7, consumed: 1 << 40, kind: FrameKind::Data(vec![9; 1000]) };
        let bytes = encode(&f);
        assert!(bytes.len() < 1020, "a 1000-byte data frame takes {} bytes", bytes.len());
        assert_eq!(decode::<Frame>(&bytes).unwrap(), f);
    }

    #[test]
    fn another_version_and_trailing_bytes_are_refused() {
        let mut bytes = postcard::to_stdvec(&Versioned { version: 99, body: NodeControlRequest::Ping }).unwrap();
        assert!(matches!(decode::<NodeControlRequest>(&bytes), Err(WireError::Version { got: 99 })));
        bytes = encode(&NodeControlRequest::Ping);
        bytes.push(0);
        assert!(matches!(decode::<NodeControlRequest>(&bytes), Err(WireError::Decode(_))));
        assert!(decode::<NodeControlRequest>(&[0xff; 3]).is_err());
        assert!(decode::<NodeControlRequest>(&[]).is_err());
    }

    /// An `OpenRequest` as a version-1 (bincode 2, standard config) node wrote it: version 1 as
    /// one byte, then each string as a one-byte length and its bytes. Its body is also a valid
    /// postcard `OpenRequest`, which is why the version is read and checked first.
    #[test]
    fn a_version_1_bincode_open_request_is_refused_as_another_version_not_misread() {
        let mut v1 = vec![1u8];
        for s in ["s1", "n-a", "n-b", "proof"] {
            v1.push(s.len() as u8);
            v1.extend_from_slice(s.as_bytes());
        }
        let (body, rest): (OpenRequest, &[u8]) = postcard::take_from_bytes(&v1[1..]).unwrap();
        assert!(rest.is_empty() && body.session == "s1", "the body alone would be misread: {body:?}");
        let err = decode::<OpenRequest>(&v1).unwrap_err();
        assert!(matches!(err, WireError::Version { got: 1 }), "{err:?}");
        assert_eq!(err.to_string(), "a peer speaks wire version 1, this node 2");
    }

    #[test]
    fn the_cookie_proof_binds_every_field() {
        let p = cookie_proof("c", "s", "a", "b");
        assert_eq!(p, cookie_proof("c", "s", "a", "b"));
        assert_ne!(p, cookie_proof("c2", "s", "a", "b"));
        assert_ne!(p, cookie_proof("c", "s", "b", "a"));
        // Length-prefixed: moving a character between fields changes the proof.
        assert_ne!(cookie_proof("ab", "c", "x", "y"), cookie_proof("a", "bc", "x", "y"));
    }

    fn refusal_code() -> impl Strategy<Value = RefusalCode> {
        prop_oneof![
            Just(RefusalCode::CookieMismatch),
            Just(RefusalCode::WrongName),
            Just(RefusalCode::AlreadyConnected),
            Just(RefusalCode::Leaving),
            Just(RefusalCode::Version),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let kind = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..4096).prop_map(FrameKind::Data),
            Just(FrameKind::Heartbeat),
            ".{0,64}".prop_map(FrameKind::Close),
        ];
        (any::<u64>(), any::<u64>(), kind).prop_map(|(seq, consumed, kind)| Frame { seq, consumed, kind })
    }

    fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) -> Result<(), TestCaseError> {
        let bytes = encode(v);
        prop_assert_eq!(&decode::<T>(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?, v);
        // Every strict prefix is refused, never read as another value.
        for cut in [0, bytes.len() / 2, bytes.len().saturating_sub(1)] {
            if cut < bytes.len() {
                prop_assert!(decode::<T>(&bytes[..cut]).is_err(), "a {cut}-byte prefix of {:?} decoded", v);
            }
        }
        Ok(())
    }

    proptest! {
        /// Every message that crosses nodes comes back equal from its bytes.
        #[test]
        fn every_wire_message_round_trips(
            f in frame(),
            session in "[a-z0-9]{0,32}", dialer in "[a-z0-9-]{0,16}", acceptor in "\\PC{0,16}", proof in "[0-9a-f]{0,64}",
            code in refusal_code(), message in "\\PC{0,80}",
            job_id in "\\PC{0,40}", node in "\\PC{0,20}", slot in "[a-z]{3}:[0-9]", flag in any::<bool>(),
        ) {
            round_trips(&f)?;
            round_trips(&OpenRequest { session, dialer, acceptor, proof })?;
            round_trips(&OpenReply::Accepted)?;
            round_trips(&OpenReply::Refused { code, message })?;
            round_trips(&NodeControlRequest::Ping)?;
            round_trips(&NodeControlRequest::CancelJob { job_id })?;
            round_trips(&NodeControlRequest::Drain)?;
            round_trips(&NodeControlReply::Pong { node: node.clone() })?;
            round_trips(&NodeControlReply::Cancelled { node: node.clone(), was_running: flag })?;
            round_trips(&NodeControlReply::Draining { node: node.clone() })?;
            round_trips(&GpuControlRequest::Restart)?;
            round_trips(&GpuControlReply::Restarting { node: node.clone(), slot: slot.clone() })?;
            round_trips(&GpuControlReply::NotRunning { node, slot })?;
        }
    }
}
