//! `[webhooks]`: signed HTTP callbacks of job events (see `kiln_core::webhook` for the rules and
//! `docs/PROTOCOL.md`, "Webhooks", for the wire). A job's own webhook (submit's `webhook`) is
//! signed with `secret`; each `[[webhooks.endpoints]]` entry with its own.

use serde::{Deserialize, Serialize};

use super::error::{invalid, ConfigError};
use kiln_contract::protocol::WebhookEvent;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The secret (`whsec_<base64>`) that signs the webhooks jobs name at submit. Empty: a
    /// submit with a `webhook` is refused (`bad_request`), since an unsigned callback could be
    /// forged by anyone who learns the URL.
    pub secret: String,
    /// Lets webhooks reach private, loopback and link-local addresses (tests, a receiver on the
    /// same host or network). Off: such a URL is refused at submit when it names the address,
    /// and each attempt refuses a host that resolves to one (recorded `address_refused`).
    pub allow_loopback: bool,
    /// How long a message is retried after its event before it is given up (seconds).
    pub retry_for_s: u64,
    /// First retry delay; doubled each attempt up to `backoff_max_ms`, each with jitter.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// One attempt's whole time (connect, send, answer); past it the attempt is a `timeout`.
    pub timeout_ms: u64,
    /// At most one `progress` message per job per this interval (the latest wins).
    pub progress_interval_ms: u64,
    /// Endpoints that receive the events of every job of some models.
    pub endpoints: Vec<WebhookEndpoint>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            secret: String::new(),
            allow_loopback: false,
            retry_for_s: 24 * 3600,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 600_000,
            timeout_ms: 15_000,
            progress_interval_ms: 1_000,
            endpoints: vec![],
        }
    }
}

impl std::fmt::Debug for WebhooksConfig {
    /// Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("secret", &if self.secret.is_empty() { "" } else { "<redacted>" })
            .field("allow_loopback", &self.allow_loopback)
            .field("retry_for_s", &self.retry_for_s)
            .field("timeout_ms", &self.timeout_ms)
            .field("progress_interval_ms", &self.progress_interval_ms)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// One `[[webhooks.endpoints]]`: every job of `models` submitted with one of `api_keys` (each
/// list: any when empty) is sent there.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookEndpoint {
    /// Names the endpoint in the delivery log and picks its secret on delivery (the stored
    /// message carries the name, never the secret).
    pub name: String,
    pub url: String,
    /// Empty: the terminal events.
    pub events: Vec<WebhookEvent>,
    pub secret: String,
    /// The models whose jobs it receives; empty: every model.
    pub models: Vec<String>,
    /// The API keys (`[[http.api_keys]] name`) whose jobs it receives, by the `api_key` label
    /// a gateway sets on the jobs it submits; empty: jobs of any key and jobs without one.
    pub api_keys: Vec<String>,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("models", &self.models)
            .field("api_keys", &self.api_keys)
            .finish()
    }
}

impl WebhooksConfig {
    /// The secret that signs messages for `endpoint` (`None`: a job's own webhook).
    pub fn secret_of(&self, endpoint: Option<&str>) -> Option<&str> {
        match endpoint {
            None => Some(self.secret.as_str()).filter(|s| !s.is_empty()),
            Some(name) => self.endpoints.iter().find(|e| e.name == name).map(|e| e.secret.as_str()),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let check_secret = |key: String, secret: &str| -> Result<(), ConfigError> {
            if crate::webhook::decode_secret(secret).is_none() {
                return Err(invalid(
                    key,
                    "must be `whsec_` and the base64 of 24 to 64 random bytes (`echo whsec_$(openssl rand -base64 32)` makes one)",
                ));
            }
            Ok(())
        };
        if !self.secret.is_empty() {
            check_secret("webhooks.secret".into(), &self.secret)?;
        }
        if self.timeout_ms == 0 {
            return Err(invalid("webhooks.timeout_ms", "must be positive"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err(invalid("webhooks.backoff_max_ms", "must be positive and at least backoff_initial_ms"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            if !crate::ids::is_valid_token(&e.name) || !names.insert(e.name.as_str()) {
                return Err(invalid(format!("webhooks.endpoints[{i}].name"), "must be a unique name of letters, digits, '-' or '_'"));
            }
            if let Err(why) = crate::webhook::check_url(&e.url, true) {
                return Err(invalid(format!("webhooks.endpoints[{i}].url"), why));
            }
            check_secret(format!("webhooks.endpoints[{i}].secret"), &e.secret)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ClusterConfig;

    fn check(toml: &str) -> Result<ClusterConfig, String> {
        let toml = format!("[[models]]\nname = \"noop\"\nengine = {{ kind = \"noop\" }}\n{toml}");
        let c = ClusterConfig::from_toml(&toml, "test").map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn webhooks_are_off_by_default_and_their_secrets_and_endpoints_checked() {
        let c = check("").expect("defaults");
        assert!(c.webhooks.secret.is_empty() && !c.webhooks.allow_loopback && c.webhooks.endpoints.is_empty());
        assert!(check("[webhooks]\nsecret = \"plain\"").unwrap_err().contains("webhooks.secret"));
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let c = check(&format!("[webhooks]\nsecret = \"{secret}\"\nallow_loopback = true")).expect("valid");
        assert_eq!(c.webhooks.secret_of(None), Some(secret));
        let endpoint = |name: &str, url: &str, secret: &str| {
            format!("[[webhooks.endpoints]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret = \"{secret}\"\nevents = [\"completed\"]\n")
        };
        let ok = check(&endpoint("ops", "https://example.com/h", secret)).expect("valid");
        assert_eq!(ok.webhooks.secret_of(Some("ops")), Some(secret));
        assert_eq!(ok.webhooks.secret_of(None), None, "job webhooks need [webhooks] secret");
        assert!(check(&endpoint("ops", "ftp://example.com/h", secret)).unwrap_err().contains("webhooks.endpoints[0].url"));
        assert!(check(&endpoint("ops", "https://example.com/h", "")).unwrap_err().contains("webhooks.endpoints[0].secret"));
        let twice = format!("{}{}", endpoint("ops", "https://a.example/h", secret), endpoint("ops", "https://b.example/h", secret));
        assert!(check(&twice).unwrap_err().contains("webhooks.endpoints[1].name"));
        assert!(check("[[webhooks.endpoints]]\nname = \"x\"\nurl = \"https://a.example\"\nevents = [\"finished\"]").is_err());
        assert!(!format!("{:?}", ok.webhooks).contains(secret), "Debug never prints a secret");
    }
}
