//! How a process reaches the cluster: the `[nats]` section (server URLs, credentials, TLS,
//! stream replicas, the subject prefix) and the `[cluster]` section (the actor cluster's link
//! between nodes, its cookie). Secrets never show in `{:?}`.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub(crate) use kiln_client::connect::redact;
pub use kiln_client::connect::{NatsAuth, NatsConfig};

use super::error::{invalid, ConfigError};
use crate::ids;

/// The actor cluster (ractor_cluster sessions tunnelled through NATS between every two nodes).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterLink {
    /// Shared secret of the actor cluster: a node with another cookie is refused by its peers.
    /// Set it (or `KILN_CLUSTER__COOKIE`) on any cluster reachable by others.
    pub cookie: String,
    /// Each tunnel sends a heartbeat frame this often when it has nothing else to send.
    pub heartbeat_ms: u64,
    /// A tunnel that receives nothing for this long closes (its peer or the link is gone).
    pub silence_ms: u64,
    /// Bytes a tunnel may have sent and not yet seen consumed by the peer: a slow peer makes
    /// the sender wait instead of growing memory.
    pub window_bytes: u64,
    /// The largest data frame, kept well under the NATS payload limit.
    pub frame_bytes: u64,
    /// How often a node re-dials a peer it wants a session with (one it called, or that called
    /// it) while that session is down, and closes sessions idle past `idle_session_ms`.
    pub redial_ms: u64,
    /// A session that carried no actor message for this long is closed, so a node holds
    /// sessions only with the peers it talks to, not with every node of the cluster; the next
    /// call dials again. 0 keeps sessions open for ever.
    pub idle_session_ms: u64,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink")
            .field("cookie", &redact(&self.cookie))
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("silence_ms", &self.silence_ms)
            .field("window_bytes", &self.window_bytes)
            .field("frame_bytes", &self.frame_bytes)
            .field("redial_ms", &self.redial_ms)
            .field("idle_session_ms", &self.idle_session_ms)
            .finish()
    }
}

impl Default for ClusterLink {
    fn default() -> Self {
        ClusterLink {
            cookie: "kiln-dev-cookie".into(),
            heartbeat_ms: 500,
            silence_ms: 2_000,
            window_bytes: 4 << 20,
            frame_bytes: 256 << 10,
            redial_ms: 500,
            idle_session_ms: 60_000,
        }
    }
}

/// The config file's rules for the `[nats]` settings (the type itself is the client's,
/// `kiln_client::NatsConfig`: programs that only connect need no more).
pub trait NatsRules {
    /// The checks of the connection keys: one authentication method, files that exist, a
    /// client certificate with its key.
    fn validate(&self) -> Result<(), ConfigError>;
}

impl NatsRules for NatsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !ids::is_valid_token(&self.prefix) {
            return Err(invalid("nats.prefix", "must be letters, digits, '-' or '_'"));
        }
        if self.ack_wait_ms < 1_000 {
            return Err(invalid("nats.ack_wait_ms", "must be at least 1000"));
        }
        if ![1, 3, 5].contains(&self.replicas) {
            return Err(invalid("nats.replicas", format!("must be 1, 3 or 5 (a RAFT group of that many servers), got {}", self.replicas)));
        }
        if self.url == "embedded" && self.replicas != 1 {
            return Err(invalid("nats.replicas", "must be 1 with the embedded server (one nats-server); point nats.url at a cluster"));
        }
        let methods: Vec<&str> = [
            ("nats.user/nats.password", !self.user.is_empty() || !self.password.is_empty()),
            ("nats.token", !self.token.is_empty()),
            ("nats.nkey_seed_file", !self.nkey_seed_file.is_empty()),
            ("nats.creds_file", !self.creds_file.is_empty()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect();
        if methods.len() > 1 {
            return Err(invalid(methods[1], format!("conflicts with {}: configure one authentication method", methods[0])));
        }
        if self.user.is_empty() != self.password.is_empty() {
            let key = if self.user.is_empty() { "nats.user" } else { "nats.password" };
            return Err(invalid(key, "must be set together with nats.user and nats.password (KILN_NATS_PASSWORD)"));
        }
        for (key, path) in [
            ("nats.nkey_seed_file", &self.nkey_seed_file),
            ("nats.creds_file", &self.creds_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                return Err(invalid(key, format!("{path:?} is not a readable file")));
            }
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            let key = if self.tls_cert_file.is_empty() { "nats.tls_cert_file" } else { "nats.tls_key_file" };
            return Err(invalid(key, "a client certificate needs both nats.tls_cert_file and nats.tls_key_file"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::layers::merged_with;
    use crate::config::load::{ClusterConfig, MINIMAL};

    #[test]
    fn a_nats_cluster_is_a_list_of_seeds_with_replicas_checked() {
        let n = NatsConfig::for_url("nats://a:4222, nats://b:4222,tls://c:4222");
        assert_eq!(n.urls(), ["nats://a:4222", "nats://b:4222", "tls://c:4222"]);
        assert!(n.tls(), "one tls:// seed asks for TLS");
        let check = |nats: &str| {
            let mut c = ClusterConfig::from_toml(MINIMAL, "t").unwrap();
            c.nats = ClusterConfig::from_toml(nats, "t").unwrap().nats;
            c.validate().map_err(|e| e.to_string())
        };
        assert_eq!(check("[nats]\nurl = \"nats://a:1,nats://b:1,nats://c:1\"\nreplicas = 3"), Ok(()));
        assert!(check("[nats]\nurl = \"nats://a:1\"\nreplicas = 2").unwrap_err().contains("nats.replicas"));
        assert!(check("[nats]\nreplicas = 3").unwrap_err().contains("embedded"), "the embedded server is one server");
        let n = merged_with(None, &[("KILN_NATS_URL", "nats://a:1"), ("KILN_NATS_REPLICAS", "5")], &[]).unwrap().nats;
        assert_eq!(n.replicas, 5);
        assert!(merged_with(None, &[("KILN_NATS_REPLICAS", "three")], &[]).is_err());
    }

    #[test]
    fn nats_credentials_are_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.pem");
        std::fs::write(&file, "x").unwrap();
        let f = file.display().to_string();
        let check =
            |toml: &str| ClusterConfig::from_toml(&format!("{toml}\n{MINIMAL}"), "t").unwrap().validate().map_err(|e| e.to_string());
        assert!(check("[nats]\nuser = \"u\"").unwrap_err().contains("nats.password"));
        assert!(check("[nats]\npassword = \"p\"").unwrap_err().contains("nats.user"));
        let two = check(&format!("[nats]\nuser = \"u\"\npassword = \"p\"\ncreds_file = \"{f}\"")).unwrap_err();
        assert!(two.contains("nats.creds_file") && two.contains("one authentication method"), "{two}");
        assert!(check("[nats]\ntoken = \"t\"\nnkey_seed_file = \"/nope\"").unwrap_err().contains("nats.nkey_seed_file"));
        assert!(check("[nats]\ncreds_file = \"/no/such.creds\"").unwrap_err().contains("nats.creds_file"));
        assert!(check("[nats]\ntls_ca_file = \"/no/ca.pem\"").unwrap_err().contains("nats.tls_ca_file"));
        assert!(check(&format!("[nats]\ntls_key_file = \"{f}\"")).unwrap_err().contains("nats.tls_cert_file"));
        assert!(check(&format!("[nats]\ntls_cert_file = \"{f}\"")).unwrap_err().contains("nats.tls_key_file"));
        check(&format!("[nats]\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\ntls_ca_file = \"{f}\"\ntoken = \"t\"")).unwrap();

        // Secrets come from the environment too, and never show in Debug output.
        let file = format!("[nats]\nuser = \"kiln\"\n[cluster]\ncookie = \"c00kie\"\n{MINIMAL}");
        let c = merged_with(Some(&file), &[("KILN_NATS_PASSWORD", "hunter2-secret")], &[]).unwrap();
        c.validate().unwrap();
        assert!(c.nats.auth() == NatsAuth::UserPassword { user: "kiln", password: "hunter2-secret" });
        let shown = format!("{c:?} {:?}", c.nats);
        assert!(!shown.contains("hunter2") && !shown.contains("c00kie") && shown.contains("<redacted>"), "{shown}");
        let c = merged_with(None, &[("KILN_NATS_TOKEN", "tok-secret")], &[]).unwrap();
        assert!(!format!("{c:?}").contains("tok-secret"));
        assert!(c.nats.auth() == NatsAuth::Token("tok-secret"));
        assert!(!c.nats.tls());
        assert!(merged_with(None, &[("KILN_NATS_TLS_REQUIRED", "true")], &[]).unwrap().nats.tls());
        let maybe = merged_with(None, &[("KILN_NATS__TLS_REQUIRED", "maybe")], &[]).unwrap_err().to_string();
        assert!(maybe.contains("KILN_NATS__TLS_REQUIRED") && maybe.contains("nats.tls_required"), "{maybe}");
        assert!(NatsConfig::for_url("tls://h:4222").tls());
    }
}
