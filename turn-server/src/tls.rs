//! TLS for the `turns:` listener, with rustls.
//!
//! The crypto provider is *ring*, chosen explicitly (rustls' default would be aws-lc-rs):
//! ring builds with only a C compiler, while aws-lc-rs needs cmake (and Go or NASM for some
//! targets) and compiles a much larger C library, a real cost on this project's 2-core
//! build machines; for what a TURN server needs (TLS 1.3 and 1.2 with AES-GCM and
//! ChaCha20-Poly1305, ECDSA, Ed25519 and RSA certificates) ring has everything, with
//! assembly for the hot ciphers. Post-quantum key exchange (X25519MLKEM768) exists only
//! with aws-lc-rs in rustls 0.23; that is the one thing given up.
//!
//! The certificate is served through a resolver that can be swapped while connections
//! run: [`TlsCerts::reload`] reads the files again (on SIGHUP, or when the control thread
//! sees them change), and new handshakes get the new certificate while established
//! connections keep theirs. A file that cannot be read, holds no certificate or key, or
//! whose key does not match the certificate is refused with the reason, and the running
//! certificate stays.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use anyhow::{Context, Result, bail};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// The certificate files and what was last loaded from them.
#[derive(Debug)]
pub struct TlsCerts {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

/// A certificate and key that were read and belong together, not served yet.
#[derive(Debug)]
pub struct StagedCert(Loaded);

#[derive(Debug, Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Modification times of the two files when they were read.
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

impl ResolvesServerCert for TlsCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock means a reload panicked halfway: keep serving what is there.
        let current = match self.current.read() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        Some(Arc::clone(&current.key))
    }
}

impl TlsCerts {
    /// Loads `cert` and `key` (PEM), checking that they belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<TlsCerts>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load_pair(cert, key, &provider)?;
        Ok(Arc::new(TlsCerts {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            current: RwLock::new(loaded),
        }))
    }

    /// The rustls configuration of the listener: TLS 1.3 and 1.2, no client
    /// certificates, ALPN none (TURN over TLS has no ALPN of its own).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>> {
        let config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        Ok(Arc::new(config))
    }

    /// True when either file changed since it was last read (a cheap `stat` of both).
    pub fn changed_on_disk(&self) -> bool {
        let now = (mtime(&self.cert), mtime(&self.key));
        let current = match self.current.read() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        now != current.stamps
    }

    /// Reads the files again and serves them to new handshakes; on error the running
    /// certificate stays and the error says why.
    pub fn reload(&self) -> Result<()> {
        self.install(self.read_files()?);
        Ok(())
    }

    /// Reads and checks the files without serving them yet (a configuration reload
    /// installs them only once everything else in it is valid too).
    pub fn read_files(&self) -> Result<StagedCert> {
        Ok(StagedCert(load_pair(&self.cert, &self.key, &self.provider)?))
    }

    /// Serves a certificate read by [`Self::read_files`] to new handshakes.
    pub fn install(&self, staged: StagedCert) {
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = staged.0;
    }

    /// The certificate chain being served (leaf first), for tests and logs.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        match self.current.read() {
            Ok(c) => c.key.cert.clone(),
            Err(poisoned) => poisoned.into_inner().key.cert.clone(),
        }
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Loaded> {
    // Stamps first: a change while we read is seen at the next check.
    let stamps = (mtime(cert), mtime(key));
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)", cert.display());
    }
    let key_pem = std::fs::read(key)
        .with_context(|| format!("cannot read the TLS private key {}", key.display()))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| {
        format!("{}: no private key (expected PEM PKCS#8, PKCS#1 or SEC1)", key.display())
    })?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        anyhow::anyhow!(
            "the TLS key {} does not go with the certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Loaded { key: Arc::new(certified), stamps })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A self-signed certificate and its key, as PEM.
    fn pair(name: &str) -> (String, String) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (cert.pem(), signing_key.serialize_pem())
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("turn-tls-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn loads_a_matching_pair_and_refuses_the_rest_clearly() {
        let dir = Dir::new("load");
        let (cert_a, key_a) = pair("a.example");
        let (_, key_b) = pair("b.example");
        let cert = dir.write("cert.pem", &cert_a);
        let key = dir.write("key.pem", &key_a);
        let certs = TlsCerts::load(&cert, &key).unwrap();
        assert_eq!(certs.chain().len(), 1);
        certs.server_config().unwrap();

        let err = |c: &Path, k: &Path| format!("{:#}", TlsCerts::load(c, k).unwrap_err());
        let missing = dir.0.join("missing.pem");
        assert!(err(&missing, &key).contains("cannot read the TLS certificate"));
        assert!(err(&cert, &missing).contains("cannot read the TLS private key"));
        let other_key = dir.write("other.pem", &key_b);
        let e = err(&cert, &other_key);
        assert!(e.contains("does not go with the certificate"), "{e}");
        let garbage = dir.write("garbage.pem", "hello\n");
        assert!(err(&garbage, &key).contains("no certificate"));
        assert!(err(&cert, &garbage).contains("no private key"));
        // A key where the certificate should be.
        assert!(err(&key, &key).contains("no certificate"));
    }

    #[test]
    fn reload_swaps_the_certificate_and_keeps_it_on_error() {
        let dir = Dir::new("reload");
        let (cert_a, key_a) = pair("a.example");
        let (cert_b, key_b) = pair("b.example");
        let cert = dir.write("cert.pem", &cert_a);
        let key = dir.write("key.pem", &key_a);
        let certs = TlsCerts::load(&cert, &key).unwrap();
        let first = certs.chain();
        // Half a rotation (new certificate, old key) is refused; the old pair stays.
        dir.write("cert.pem", &cert_b);
        assert!(certs.reload().is_err());
        assert_eq!(certs.chain(), first);
        dir.write("key.pem", &key_b);
        certs.reload().unwrap();
        assert_ne!(certs.chain(), first);
    }
}
