//! Reload (SIGHUP or the admin API): the configuration is read again and what can change
//! without a restart is applied without dropping a live allocation or connection.
//!
//! All or nothing: the new file is parsed, its credentials and peer rules checked by
//! building a protocol core from them, and the TLS certificate read, before anything is
//! applied; then every worker prepares the new configuration (checks and derives it) and
//! says so, and only once all have does any apply it (an infallible switch, which each
//! worker makes at its next look at its inbox: within the same millisecond or so). A bad
//! file, or a worker that cannot prepare, leaves the running configuration in place
//! everywhere and the error says why.
//! Keys that need a restart (listeners, relay addresses, workers, steering, metrics and
//! admin endpoints, ...) are reported, not applied.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::oneshot;
use turn_proto::server::ServerConfig;

use crate::{
    config::Config,
    relay::RelayAddresses,
    setup::{self, GeneratedUser},
    shared::{ConnectionCaps, ConnectionLimits, SharedQuota},
    tls::TlsCerts,
    worker::{Command, Inbox},
};

/// The configuration keys a reload applies; every other key takes effect at the next
/// start (docs/configuration.md marks them).
pub const RELOADABLE: &[&str] = &[
    "realm",
    "users",
    "users_file",
    "static_auth_secrets",
    "static_auth_secrets_file",
    "rest_max_ttl_secs",
    "software",
    "nonce_lifetime_secs",
    "default_lifetime_secs",
    "max_lifetime_secs",
    "permission_lifetime_secs",
    "channel_lifetime_secs",
    "max_permissions_per_allocation",
    "allowed_peer_ips",
    "denied_peer_ips",
    "allow_loopback_peers",
    "allow_private_peers",
    "allow_own_address_peers",
    "unauthenticated_responses_per_sec",
    "failed_auth_per_sec",
    "binding_responses_per_sec",
    "user_quota",
    "total_quota",
    "address_quota",
    "max_connections",
    "max_connections_per_ip",
    "max_unauthenticated_connections",
    "max_unauthenticated_connections_per_ip",
    "drain_timeout_secs",
];

/// Copies the reloadable keys of `new` into `running`.
fn apply_reloadable(running: &mut Config, new: &Config) {
    running.realm.clone_from(&new.realm);
    running.users.clone_from(&new.users);
    running.users_file.clone_from(&new.users_file);
    running.static_auth_secrets.clone_from(&new.static_auth_secrets);
    running.static_auth_secrets_file.clone_from(&new.static_auth_secrets_file);
    running.rest_max_ttl_secs = new.rest_max_ttl_secs;
    running.software.clone_from(&new.software);
    running.nonce_lifetime_secs = new.nonce_lifetime_secs;
    running.default_lifetime_secs = new.default_lifetime_secs;
    running.max_lifetime_secs = new.max_lifetime_secs;
    running.permission_lifetime_secs = new.permission_lifetime_secs;
    running.channel_lifetime_secs = new.channel_lifetime_secs;
    running.max_permissions_per_allocation = new.max_permissions_per_allocation;
    running.allowed_peer_ips.clone_from(&new.allowed_peer_ips);
    running.denied_peer_ips.clone_from(&new.denied_peer_ips);
    running.allow_loopback_peers = new.allow_loopback_peers;
    running.allow_private_peers = new.allow_private_peers;
    running.allow_own_address_peers = new.allow_own_address_peers;
    running.unauthenticated_responses_per_sec = new.unauthenticated_responses_per_sec;
    running.failed_auth_per_sec = new.failed_auth_per_sec;
    running.binding_responses_per_sec = new.binding_responses_per_sec;
    running.user_quota = new.user_quota;
    running.total_quota = new.total_quota;
    running.address_quota = new.address_quota;
    running.max_connections = new.max_connections;
    running.max_connections_per_ip = new.max_connections_per_ip;
    running.max_unauthenticated_connections = new.max_unauthenticated_connections;
    running.max_unauthenticated_connections_per_ip = new.max_unauthenticated_connections_per_ip;
    running.drain_timeout_secs = new.drain_timeout_secs;
}

/// Asks every worker to prepare `config`; Ok once all have.
async fn prepare_all(workers: &[Inbox], config: &ServerConfig) -> Result<()> {
    let mut replies = Vec::with_capacity(workers.len());
    for inbox in workers {
        let (tx, rx) = oneshot::channel();
        let command = Command::Prepare(Box::new(config.clone()), tx);
        inbox.send(command).await.map_err(|_| anyhow!("a worker has stopped"))?;
        replies.push(rx);
    }
    for (i, reply) in replies.into_iter().enumerate() {
        match reply.await {
            Ok(Ok(())) => {}
            // Not expected: every worker got what a throwaway core accepted.
            Ok(Err(e)) => bail!("worker {i} refused the configuration: {e}"),
            Err(_) => bail!("worker {i} has stopped"),
        }
    }
    Ok(())
}

/// The keys whose value differs between two configurations.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::map::Map::new(),
    };
    let (a, b) = (table(a), table(b));
    let mut keys: Vec<String> =
        a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What a reload did.
#[derive(Debug, Default, PartialEq)]
pub struct Reloaded {
    /// Reloadable keys whose value changed.
    pub applied: Vec<String>,
    /// Keys that changed but need a restart (the running value stays).
    pub need_restart: Vec<String>,
    /// The TLS certificate was read again.
    pub certificate: bool,
}

/// Reads the configuration again and applies it.
pub struct Reloader {
    /// Reads the configuration as at start (the file, then the command line on top).
    read: Box<dyn Fn() -> Result<Config>>,
    running: Config,
    generated: Option<GeneratedUser>,
    relays: RelayAddresses,
    nonce_secret: [u8; 32],
    quota: Arc<SharedQuota>,
    limits: Arc<ConnectionLimits>,
    tls: Option<Arc<TlsCerts>>,
}

/// What the reloader needs of the running daemon.
pub struct ReloadSetup {
    pub read: Box<dyn Fn() -> Result<Config>>,
    pub running: Config,
    pub generated: Option<GeneratedUser>,
    pub relays: RelayAddresses,
    pub nonce_secret: [u8; 32],
    pub quota: Arc<SharedQuota>,
    pub limits: Arc<ConnectionLimits>,
    pub tls: Option<Arc<TlsCerts>>,
}

impl Reloader {
    pub fn new(s: ReloadSetup) -> Reloader {
        Reloader {
            read: s.read,
            running: s.running,
            generated: s.generated,
            relays: s.relays,
            nonce_secret: s.nonce_secret,
            quota: s.quota,
            limits: s.limits,
            tls: s.tls,
        }
    }

    /// The configuration in force.
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// The relay addresses (fixed at start).
    pub fn relays(&self) -> &RelayAddresses {
        &self.relays
    }

    /// The TLS certificate files, if TLS is on.
    pub fn tls(&self) -> Option<&TlsCerts> {
        self.tls.as_deref()
    }

    /// Reads the configuration and the certificate again; applies them to every worker
    /// (all or nothing).
    pub async fn reload(&mut self, workers: &[Inbox]) -> Result<Reloaded> {
        let new = (self.read)().context("reading the configuration")?;
        if self.generated.is_none()
            && new.all_users()?.is_empty()
            && new.all_static_auth_secrets()?.is_empty()
        {
            bail!(
                "the new configuration has no users and no static_auth_secrets: every client \
                 would be refused"
            );
        }
        let (credentials, _) = setup::credentials(&new, self.generated.as_ref())?;
        let server_config =
            setup::server_config(&new, &credentials, &self.relays, self.nonce_secret, 0)?;
        // The protocol core's own checks, on a throwaway instance.
        turn_proto::server::Server::new(server_config.clone())
            .map_err(|e| anyhow!("invalid configuration: {e}"))?;
        let staged = match &self.tls {
            Some(tls) => Some(tls.read_files().context("the TLS certificate")?),
            None => None,
        };

        // Everything is valid: every worker prepares it...
        if let Err(e) = prepare_all(workers, &server_config).await {
            for inbox in workers {
                let _ = inbox.send(Command::Abort).await;
            }
            return Err(e);
        }
        // ...then all apply it.
        for inbox in workers {
            // A worker that stopped now takes the daemon down (the control loop sees it).
            let _ = inbox.send(Command::Commit).await;
        }
        self.quota.set_limits(new.user_quota, new.address_quota, new.total_quota);
        self.limits.set_limits(ConnectionCaps::of(&new));
        let certificate = match (&self.tls, staged) {
            (Some(tls), Some(staged)) => {
                tls.install(staged);
                true
            }
            _ => false,
        };
        let mut next = self.running.clone();
        apply_reloadable(&mut next, &new);
        let applied = changed_keys(&self.running, &next);
        let need_restart = changed_keys(&next, &new);
        self.running = next;
        Ok(Reloaded { applied, need_restart, certificate })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_reloadable_key_is_a_configuration_key_and_is_applied() {
        let defaults = Config::default();
        let mut changed = Config::from_toml(
            r#"
            realm = "example.org"
            users = ["alice:pw"]
            users_file = "/dev/null"
            static_auth_secrets = ["s"]
            static_auth_secrets_file = "/dev/null"
            rest_max_ttl_secs = 7
            software = "x"
            nonce_lifetime_secs = 7
            default_lifetime_secs = 77
            max_lifetime_secs = 777
            permission_lifetime_secs = 7
            channel_lifetime_secs = 7
            max_permissions_per_allocation = 7
            allowed_peer_ips = ["10.0.0.1"]
            denied_peer_ips = ["192.0.2.0/24"]
            allow_loopback_peers = true
            allow_private_peers = true
            allow_own_address_peers = true
            unauthenticated_responses_per_sec = 7
            failed_auth_per_sec = 7
            binding_responses_per_sec = 7
            user_quota = 7
            total_quota = 7
            address_quota = 7
            max_connections = 7
            max_connections_per_ip = 7
            max_unauthenticated_connections = 7
            max_unauthenticated_connections_per_ip = 7
            drain_timeout_secs = 7
            "#,
        )
        .unwrap();
        let mut every: Vec<String> = RELOADABLE.iter().map(|k| k.to_string()).collect();
        every.sort();
        assert_eq!(changed_keys(&defaults, &changed), every);
        let mut running = defaults.clone();
        apply_reloadable(&mut running, &changed);
        assert_eq!(running, changed);
        // A key outside the list is reported, not applied.
        changed.listening_port = 1;
        let mut running = defaults.clone();
        apply_reloadable(&mut running, &changed);
        assert_eq!(changed_keys(&running, &changed), vec!["listening_port".to_string()]);
    }

    /// docs/configuration.md's Reload section names every key a reload applies.
    #[test]
    fn the_docs_list_every_reloadable_key() {
        let doc = include_str!("../../../docs/configuration.md");
        let section = doc.split("\n## Reload\n").nth(1).unwrap();
        let section = section.split("\n## ").next().unwrap();
        for key in RELOADABLE {
            assert!(section.contains(&format!("`{key}`")), "the Reload section misses `{key}`");
        }
    }
}
