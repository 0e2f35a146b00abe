//! TLS on migration channels with QEMU's x509 credentials (`tls-creds-x509`), on
//! rustls.
//!
//! A credentials directory holds QEMU's file names: `ca-cert.pem` (the CA that
//! signs both ends), `server-cert.pem`/`server-key.pem` (the destination, TLS
//! server) and `client-cert.pem`/`client-key.pem` (the source, TLS client; optional
//! as in QEMU). With `verify-peer` (on by default, as in QEMU) the client checks
//! the server's certificate against the CA and the `tls-hostname`, and the server
//! requires a client certificate signed by the CA; a `tls-authz` allow-list
//! ([`TlsAuthz`]) further limits clients to certificates with listed
//! distinguished names (written as GnuTLS, hence QEMU 7.2, writes them: in
//! certificate order, `C=GB,O=Example,CN=client`).
//!
//! The session ([`TlsStream`]) lives inside a [`Channel`](crate::Channel): the
//! channel and its [`ReturnPath`](crate::ReturnPath) read and write the same
//! session from different threads, each taking the session's lock only for the
//! non-blocking socket call and the record work, never while waiting, so a cancel
//! (which shuts the socket down and wakes every waiter) can never hang behind it.

use crate::cancel::{CancelToken, Wake};
use nix::poll::PollFlags;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The CA certificate(s) in a credentials directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's (server's) certificate.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's (server's) private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's (client's) certificate (optional).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's (client's) private key (optional, with the certificate).
pub const CLIENT_KEY: &str = "client-key.pem";
/// The CA's certificate revocation list(s) (optional, as in QEMU): with verify-peer, a
/// peer whose certificate is listed is refused.
pub const CA_CRL: &str = "ca-crl.pem";

/// Most plaintext bytes taken from the caller per TLS write call.
const WRITE_CHUNK: usize = 64 * 1024;

/// A TLS failure: loading credentials, the handshake, or the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("TLS credentials: {path}: {why}")]
    Creds {
        /// The file (or directory).
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The options do not fit together (no hostname for a unix socket, ...).
    #[error("TLS: {0}")]
    Config(String),
    /// The TLS handshake failed; `why` names the cause.
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake {
        /// The peer.
        peer: String,
        /// The cause, in words.
        why: String,
    },
    /// The established session failed.
    #[error("TLS session with {peer}: {why}")]
    Session {
        /// The peer.
        peer: String,
        /// The cause, in words.
        why: String,
    },
    /// A plaintext channel received the start of a TLS handshake.
    #[error("{peer} started a TLS handshake, but TLS is not configured on this side (no tls-creds)")]
    UnexpectedTls {
        /// The peer.
        peer: String,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::Creds { path: path.to_path_buf(), why };
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |why: String| TlsError::Creds { path: path.to_path_buf(), why };
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| bad(format!("no PEM private key: {e}")))
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let path = dir.join(CA_CERT);
    let mut store = rustls::RootCertStore::empty();
    for cert in read_certs(&path)? {
        store.add(cert).map_err(|e| TlsError::Creds { path: path.clone(), why: format!("unusable CA: {e}") })?;
    }
    Ok(store)
}

/// The CRLs of `ca-crl.pem` when the directory has one (QEMU loads it when present).
fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let path = dir.join(CA_CRL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bad = |why: String| TlsError::Creds { path: path.clone(), why };
    let data = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM CRL file: {e}")))?;
    if crls.is_empty() {
        return Err(bad("no X509 CRL in the file".into()));
    }
    Ok(crls)
}

fn check_dir(dir: &Path) -> Result<(), TlsError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(TlsError::Creds { path: dir.to_path_buf(), why: "not a directory".into() })
    }
}

/// The source's TLS credentials (QEMU's `tls-creds-x509` with `endpoint=client`).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    dir: PathBuf,
    verify_peer: bool,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({}, verify-peer={})", self.dir.display(), self.verify_peer)
    }
}

impl TlsClient {
    /// Load `dir`: `ca-cert.pem` (required), `client-cert.pem` with `client-key.pem`
    /// (both or neither), `ca-crl.pem` (optional). With `verify_peer` the server's
    /// certificate must chain to the CA, name the tls-hostname and not be revoked by
    /// the CRL; without, any server is accepted.
    pub fn load(dir: &Path, verify_peer: bool) -> Result<TlsClient, TlsError> {
        check_dir(dir)?;
        let roots = roots(dir)?;
        let p = provider();
        let builder = rustls::ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = if verify_peer {
            // As GnuTLS (QEMU): a certificate is revoked when a CRL lists it; an
            // issuer without a CRL revokes nothing.
            let crls = crls(dir)?;
            let named = dir.join(if crls.is_empty() { CA_CERT } else { CA_CRL });
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), p.clone())
                .with_crls(crls)
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| TlsError::Creds { path: named, why: e.to_string() })?;
            builder.with_webpki_verifier(verifier)
        } else {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServer(p)))
        };
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let config = match (cert.exists(), key.exists()) {
            (false, false) => builder.with_no_client_auth(),
            (true, true) => builder.with_client_auth_cert(read_certs(&cert)?, read_key(&key)?).map_err(|e| {
                TlsError::Creds { path: key.clone(), why: format!("does not fit the certificate: {e}") }
            })?,
            (true, false) => {
                return Err(TlsError::Creds { path: key, why: "missing (the certificate needs its key)".into() })
            }
            (false, true) => {
                return Err(TlsError::Creds { path: cert, why: "missing (the key needs its certificate)".into() })
            }
        };
        Ok(TlsClient { config: Arc::new(config), dir: dir.to_path_buf(), verify_peer })
    }

    /// The credentials directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The destination's TLS credentials (QEMU's `tls-creds-x509` with
/// `endpoint=server`), with its optional `tls-authz` allow-list.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    dir: PathBuf,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsServer({})", self.dir.display())
    }
}

impl TlsServer {
    /// Load `dir`: `server-cert.pem` and `server-key.pem` (required) and, with
    /// `verify_peer`, `ca-cert.pem` and the optional `ca-crl.pem`: clients must then
    /// present a certificate signed by the CA and not revoked by the CRL (and, with
    /// `authz`, one whose DN is on the list). Without
    /// `verify_peer` no client certificate is asked for, and `authz` is refused
    /// (it could not be checked).
    pub fn load(dir: &Path, verify_peer: bool, authz: Option<TlsAuthz>) -> Result<TlsServer, TlsError> {
        check_dir(dir)?;
        let p = provider();
        let verifier: Arc<dyn ClientCertVerifier> = if verify_peer {
            let crls = crls(dir)?;
            let named = dir.join(if crls.is_empty() { CA_CERT } else { CA_CRL });
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), p.clone())
                .with_crls(crls)
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| TlsError::Creds { path: named, why: e.to_string() })?;
            Arc::new(AuthzVerifier { inner, authz })
        } else if authz.is_some() {
            return Err(TlsError::Config("tls-authz needs verify-peer (client certificates are not asked for)".into()));
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let (cert, key) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        let mut config = rustls::ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(read_certs(&cert)?, read_key(&key)?)
            .map_err(|e| TlsError::Creds { path: key.clone(), why: format!("does not fit the certificate: {e}") })?;
        // One session per connection, never resumed: no tickets to send.
        config.send_tls13_tickets = 0;
        Ok(TlsServer { config: Arc::new(config), dir: dir.to_path_buf() })
    }

    /// The credentials directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// QEMU's `tls-authz` (an `authz-list` of exact matches, default deny): the
/// distinguished names of the client certificates allowed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsAuthz {
    allowed: Vec<String>,
}

impl TlsAuthz {
    /// An allow-list of DNs, each written as GnuTLS writes them ([`subject_dn`]: `C=GB,O=y,CN=x`).
    pub fn new(allowed: impl IntoIterator<Item = String>) -> TlsAuthz {
        TlsAuthz { allowed: allowed.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect() }
    }

    /// The allow-list in a file: one DN a line; blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: &Path) -> Result<TlsAuthz, TlsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TlsError::Creds { path: path.to_path_buf(), why: e.to_string() })?;
        Ok(TlsAuthz::new(text.lines().filter(|l| !l.trim_start().starts_with('#')).map(str::to_string)))
    }

    /// The DNs allowed.
    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// True when `dn` is on the list (exact match, as QEMU's default `format=exact`).
    pub fn allows(&self, dn: &str) -> bool {
        self.allowed.iter().any(|a| a == dn)
    }
}

/// QEMU's migration TLS parameters: `tls-creds` (here the x509 credentials
/// directory itself), `tls-hostname`, `tls-authz`, and the credentials'
/// `verify-peer` (on by default, as in QEMU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// The credentials directory (QEMU's `tls-creds-x509` `dir`).
    pub creds: PathBuf,
    /// The name checked in the server's certificate (default: the `tcp:` URI's host).
    pub hostname: Option<String>,
    /// The client DNs a server lets in (none: any client the CA signed).
    pub authz: Option<TlsAuthz>,
    /// Verify the peer (QEMU's `verify-peer`).
    pub verify_peer: bool,
}

impl TlsParams {
    /// TLS with the credentials in `creds`, verifying the peer, no hostname override, no allow-list.
    pub fn new(creds: impl Into<PathBuf>) -> TlsParams {
        TlsParams { creds: creds.into(), hostname: None, authz: None, verify_peer: true }
    }

    /// The source's credentials (loaded now).
    pub fn client(&self) -> Result<TlsClient, TlsError> {
        if self.authz.is_some() {
            return Err(TlsError::Config("tls-authz is for the destination (the TLS server)".into()));
        }
        TlsClient::load(&self.creds, self.verify_peer)
    }

    /// The destination's credentials (loaded now).
    pub fn server(&self) -> Result<TlsServer, TlsError> {
        TlsServer::load(&self.creds, self.verify_peer, self.authz.clone())
    }

    /// Connect to `uri` (see [`connect`](crate::connect)) and run the client
    /// handshake, checking the server's certificate for [`server_name`].
    pub fn connect(
        &self,
        uri: &crate::MigrationUri,
        cancel: &CancelToken,
    ) -> Result<crate::Channel, crate::TransportError> {
        self.connect_with(uri, cancel, &crate::ChannelOptions::default())
    }

    /// [`connect`](TlsParams::connect) with these channel options (the io timeout).
    pub fn connect_with(
        &self,
        uri: &crate::MigrationUri,
        cancel: &CancelToken,
        opts: &crate::ChannelOptions,
    ) -> Result<crate::Channel, crate::TransportError> {
        let creds = self.client()?;
        let name = server_name(uri, self.hostname.as_deref())?;
        crate::connect_with(uri, cancel, opts)?.tls_client(&creds, &name)
    }
}

/// A client certificate whose DN is not on the tls-authz list.
#[derive(Debug, thiserror::Error)]
#[error("client certificate '{dn}' is not on the tls-authz allow-list")]
struct NotAuthorized {
    dn: String,
}

/// The client certificate's verification, then the tls-authz check (QEMU checks
/// both after its handshake; here they fail the handshake itself, with an alert).
#[derive(Debug)]
struct AuthzVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    authz: Option<TlsAuthz>,
}

impl ClientCertVerifier for AuthzVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(authz) = &self.authz {
            let dn = subject_dn(end_entity).map_err(|why| {
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                    io::Error::other(format!("cannot read the client certificate's DN for tls-authz: {why}")),
                ))))
            })?;
            if !authz.allows(&dn) {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                    NotAuthorized { dn },
                )))));
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `verify-peer=off` on the client: any server certificate is accepted (the
/// handshake's signatures are still checked, so the session keys are the peer's).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The subject distinguished name of a DER certificate as GnuTLS 3.7 (and so
/// QEMU 7.2's tls-authz) writes it: the RDNs in certificate order (a certificate
/// made with `openssl -subj /C=GB/O=Example/CN=client` gives
/// `C=GB,O=Example,CN=client`; observed with QEMU 7.2), `,` between RDNs, `+`
/// inside one, RFC 4514 escapes, short attribute names (`CN`, `O`, `OU`, `C`, `L`, `ST`, `DC`, `UID`,
/// `EMAIL`), other attributes as `OID=#HEX`.
pub fn subject_dn(der: &[u8]) -> Result<String, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|a| {
                let oid = a.attr_type().to_id_string();
                let value = a.attr_value();
                match (attr_short_name(&oid), a.as_str()) {
                    (Some(name), Ok(s)) => format!("{name}={}", escape_dn_value(s)),
                    _ => format!("{oid}=#{}", hex(value.as_bytes())),
                }
            })
            .collect();
        rdns.push(attrs.join("+"));
    }
    Ok(rdns.join(","))
}

fn attr_short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.5" => "serialNumber",
        "2.5.4.12" => "title",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// RFC 4514 escaping of an attribute value.
fn escape_dn_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name a client checks in the server's certificate: `tls_hostname` if
/// given, else the host of a `tcp:` URI; other URIs need one (QEMU: "No hostname
/// available for TLS").
pub fn server_name(uri: &crate::MigrationUri, tls_hostname: Option<&str>) -> Result<String, TlsError> {
    match (tls_hostname, uri) {
        (Some(h), _) if !h.is_empty() => Ok(h.to_string()),
        (_, crate::MigrationUri::Tcp { host, .. }) => Ok(host.clone()),
        _ => Err(TlsError::Config(format!("no hostname available for TLS on {uri}: give tls-hostname"))),
    }
}

/// A rustls error in words, naming the cause.
fn explain(e: &rustls::Error, verify_dir: Option<&Path>) -> String {
    use rustls::AlertDescription as A;
    let ca = verify_dir.map(|d| d.join(CA_CERT).display().to_string()).unwrap_or_else(|| CA_CERT.to_string());
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!("the peer's certificate is not signed by our CA ({ca}): certificate from another CA")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the peer's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the peer's certificate is not valid yet".into()
            }
            CertificateError::NotValidForName => {
                "hostname mismatch: the server's certificate is not valid for the tls-hostname".into()
            }
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "hostname mismatch: the server's certificate is not valid for '{}' (tls-hostname); it names {}",
                server_name_str(expected),
                if presented.is_empty() { "nothing".to_string() } else { presented.join(", ") }
            ),
            CertificateError::Revoked => {
                let crl = verify_dir.map(|d| d.join(CA_CRL).display().to_string()).unwrap_or_else(|| CA_CRL.into());
                format!("the peer's certificate is revoked ({crl} lists it)")
            }
            CertificateError::Other(o) => format!("the peer's certificate was refused: {o}"),
            other => format!("the peer's certificate was refused: {other:?}"),
        },
        rustls::Error::NoCertificatesPresented => {
            "the client presented no certificate (verify-peer requires one: client-cert.pem)".into()
        }
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown => "it refused our certificate",
                A::UnknownCA => "it does not know the CA of our certificate (certificate from another CA)",
                A::CertificateExpired => "our certificate has expired",
                A::CertificateRevoked => "it holds our certificate revoked (its CRL lists it)",
                A::AccessDenied => "access denied (tls-authz?)",
                A::CertificateRequired => "it requires a client certificate (client-cert.pem)",
                A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity => "no common TLS parameters",
                _ => "it ended the session",
            };
            format!("the peer sent TLS alert {alert:?}: {why}")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the peer does not speak TLS (a plaintext migration stream? TLS must be configured on both sides)".into()
        }
        other => other.to_string(),
    }
}

fn server_name_str(n: &ServerName<'_>) -> String {
    match n {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The socket as `Read`/`Write` for rustls (non-blocking: `WouldBlock` when not ready).
struct Fd<'a>(&'a OwnedFd);

impl Read for Fd<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.0.as_fd(), buf) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }
}

impl Write for Fd<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(self.0),
                buf,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wait until `fd` is ready for `events`; with `timeout`, a [`NoProgress`](crate::NoProgress)
/// error (kind `TimedOut`) when it was not for that long.
fn wait_progress(
    cancel: &CancelToken,
    fd: &OwnedFd,
    events: PollFlags,
    timeout: Option<Duration>,
    what: &'static str,
) -> io::Result<()> {
    match cancel.wait(fd.as_fd(), events, timeout.map(|t| Instant::now() + t))? {
        Wake::Ready => Ok(()),
        Wake::Timeout => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            crate::NoProgress { what, timeout: timeout.unwrap_or_default() },
        )),
    }
}

/// Seconds as the io-timeout messages write them (`30`, `2.5`).
fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

/// Send what rustls queued (an alert, say) as far as the socket takes it now, without waiting.
fn send_queued(c: &mut rustls::Connection, fd: &OwnedFd) {
    while c.wants_write() {
        if c.write_tls(&mut Fd(fd)).is_err() {
            break;
        }
    }
}

/// How long a refusing server waits for its client to stop sending.
const LINGER: std::time::Duration = std::time::Duration::from_millis(250);

/// After a refusing alert: end our side and keep the connection for at most
/// [`LINGER`] (or until the client closes), reading nothing. A TLS 1.3 client has
/// finished its handshake and is sending its stream when the server refuses its
/// certificate: closing at once on its unread data would reset the connection,
/// and the reset can overtake the alert. The data is not read either: a client
/// with no return path (QEMU without `return-path`) would take a drained stream
/// for a delivered one; here its writes stall, then fail on the close.
fn linger(fd: &OwnedFd, cancel: &CancelToken) {
    let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(fd), nix::sys::socket::Shutdown::Write);
    let deadline = std::time::Instant::now() + LINGER;
    // Wakes when the client closes (or the socket fails), else at the deadline.
    let _ = cancel.wait(fd.as_fd(), PollFlags::from_bits_retain(libc::POLLRDHUP), Some(deadline));
}

/// An established TLS session on a non-blocking socket, shared by a channel and
/// its return path (one reader and one writer thread at a time).
pub(crate) struct TlsStream {
    conn: Mutex<rustls::Connection>,
    fd: OwnedFd,
    peer: String,
    /// The verifying CA directory (for messages).
    dir: PathBuf,
    /// The session ended with this error: later calls (either thread) fail with it at once.
    failed: Mutex<Option<String>>,
    /// We are the TLS server (the destination).
    is_server: bool,
    /// Some application data came from the peer.
    received: AtomicBool,
    /// The channel's io timeout: the bound on the handshake, and on the close_notify's send.
    io_timeout: Option<Duration>,
}

impl TlsStream {
    /// Run the client handshake on `fd` (non-blocking), checking `hostname`.
    pub(crate) fn client(
        fd: OwnedFd,
        creds: &TlsClient,
        hostname: &str,
        peer: &str,
        cancel: &CancelToken,
        io_timeout: Option<Duration>,
    ) -> io::Result<TlsStream> {
        let name = ServerName::try_from(hostname.to_string()).map_err(|e| {
            io::Error::other(TlsError::Config(format!("'{hostname}' is not a valid TLS hostname: {e}")))
        })?;
        let conn = rustls::ClientConnection::new(creds.config.clone(), name)
            .map_err(|e| io::Error::other(TlsError::Handshake { peer: peer.to_string(), why: e.to_string() }))?;
        TlsStream::handshake(conn.into(), fd, peer, &creds.dir, cancel, io_timeout)
    }

    /// Run the server handshake on `fd` (non-blocking).
    pub(crate) fn server(
        fd: OwnedFd,
        creds: &TlsServer,
        peer: &str,
        cancel: &CancelToken,
        io_timeout: Option<Duration>,
    ) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(creds.config.clone())
            .map_err(|e| io::Error::other(TlsError::Handshake { peer: peer.to_string(), why: e.to_string() }))?;
        TlsStream::handshake(conn.into(), fd, peer, &creds.dir, cancel, io_timeout)
    }

    /// The handshake, bounded by `io_timeout` as a whole: a peer that connects and
    /// sends nothing (or stops half-way) fails it then, with the cause in words.
    fn handshake(
        conn: rustls::Connection,
        fd: OwnedFd,
        peer: &str,
        dir: &Path,
        cancel: &CancelToken,
        io_timeout: Option<Duration>,
    ) -> io::Result<TlsStream> {
        let is_server = matches!(conn, rustls::Connection::Server(_));
        let s = TlsStream {
            conn: Mutex::new(conn),
            fd,
            peer: peer.to_string(),
            dir: dir.to_path_buf(),
            failed: Mutex::new(None),
            is_server,
            received: AtomicBool::new(false),
            io_timeout,
        };
        let fail = |why: String| io::Error::other(TlsError::Handshake { peer: peer.to_string(), why });
        let deadline = io_timeout.map(|t| Instant::now() + t);
        // Handshake bytes came from the peer (for the timeout's message).
        let mut heard = false;
        loop {
            let mut c = s.lock()?;
            if !c.is_handshaking() {
                break;
            }
            // Send what the handshake has to say, then wait for the peer's answer.
            while c.wants_write() {
                match c.write_tls(&mut Fd(&s.fd)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(s.handshake_io_error(c, e, &fail)),
                }
            }
            let want = if c.wants_write() { PollFlags::POLLOUT } else { PollFlags::POLLIN };
            if want == PollFlags::POLLIN {
                match c.read_tls(&mut Fd(&s.fd)) {
                    Ok(0) => {
                        return Err(fail(
                            "the peer closed the connection during the handshake (it refused us, or TLS is not \
                             configured on its side)"
                                .into(),
                        ))
                    }
                    Ok(_) => {
                        heard = true;
                        if let Err(e) = c.process_new_packets() {
                            // Tell the peer why (the alert rustls queued), best effort.
                            send_queued(&mut c, &s.fd);
                            if is_server {
                                linger(&s.fd, cancel);
                            }
                            return Err(fail(explain(&e, Some(dir))));
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(s.handshake_io_error(c, e, &fail)),
                }
            }
            drop(c);
            if cancel.wait(s.fd.as_fd(), want, deadline)? == Wake::Timeout {
                let t = fmt_secs(io_timeout.unwrap_or_default());
                return Err(fail(if heard {
                    format!(
                        "the peer stopped answering half-way through the handshake: not done within {t} s (io-timeout)"
                    )
                } else {
                    format!(
                        "the peer sent no TLS handshake within {t} s (io-timeout): it does not speak TLS \
                         (TLS not configured on its side?), or the link is gone"
                    )
                }));
            }
        }
        // The last flight (the client's Finished) goes out before the stream starts.
        s.flush(cancel, io_timeout).map_err(|e| fail(e.to_string()))?;
        Ok(s)
    }

    /// A socket error during the handshake: an alert the peer sent before closing
    /// explains it better than ECONNRESET.
    fn handshake_io_error(
        &self,
        mut c: MutexGuard<'_, rustls::Connection>,
        e: io::Error,
        fail: &dyn Fn(String) -> io::Error,
    ) -> io::Error {
        match self.pending_alert(&mut c) {
            Some(why) => fail(why),
            None if matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE)) => fail(format!(
                "the peer closed the connection during the handshake ({e}; it refused us, or TLS is not \
                 configured on its side)"
            )),
            None => fail(format!("connection lost: {e}")),
        }
    }

    /// After a failed socket call: read what the peer sent before it closed and
    /// return its alert in words, if there is one.
    fn pending_alert(&self, c: &mut rustls::Connection) -> Option<String> {
        for _ in 0..64 {
            match c.read_tls(&mut Fd(&self.fd)) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Err(e) = c.process_new_packets() {
                        return Some(explain(&e, Some(&self.dir)));
                    }
                }
            }
        }
        None
    }

    /// The peer ended the session without ever sending data: GnuTLS peers (QEMU)
    /// check certificates after the handshake and just close when they refuse
    /// them, so that is what it means (a source always starts with its header, a
    /// destination answers the return path's first PING).
    fn refused_after_handshake(&self) -> Option<io::Error> {
        if self.received.load(Ordering::SeqCst) {
            return None;
        }
        let why = if self.is_server {
            "the source closed the TLS session right after the handshake without sending anything: it refused our \
             certificate (another CA, expired, or not valid for its tls-hostname)"
        } else {
            "the destination closed the TLS session right after the handshake without sending anything: it \
             refused our certificate (another CA, expired, or not on its tls-authz)"
        };
        Some(self.session_error(why.into()))
    }

    /// A read of `n` bytes of application data (n > 0 marks the peer as heard from).
    fn got(&self, n: usize, cancel: &CancelToken) -> io::Result<usize> {
        // A cancel shuts the socket down: the end it reads is ours, not the peer's.
        cancel.check()?;
        if n > 0 {
            self.received.store(true, Ordering::Relaxed);
            Ok(n)
        } else {
            self.refused_after_handshake().map_or(Ok(0), Err)
        }
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, rustls::Connection>> {
        self.conn.lock().map_err(|_| io::Error::other("TLS session lock poisoned"))
    }

    /// The session failed: `why`, unless it failed before (then the first cause,
    /// which both threads report).
    fn session_error(&self, why: String) -> io::Error {
        let why = match self.failed.lock() {
            Ok(mut f) => f.get_or_insert(why).clone(),
            Err(_) => why,
        };
        io::Error::other(TlsError::Session { peer: self.peer.clone(), why })
    }

    fn check_failed(&self) -> io::Result<()> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(why) => Err(io::Error::other(TlsError::Session { peer: self.peer.clone(), why })),
            None => Ok(()),
        }
    }

    /// A reset or broken connection: a refusal when the peer never sent anything.
    fn broken(&self, e: io::Error) -> io::Error {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => self.refused_after_handshake().unwrap_or(e),
            _ => e,
        }
    }

    /// Read decrypted bytes into `buf`; blocks until data, end of stream (0) or
    /// cancel. The end of the connection without the peer's close_notify also
    /// reads as end of stream: QEMU 7.2 closes its side that way, and the
    /// migration stream ends with its own EOF record, whose absence the stream
    /// reader reports.
    ///
    /// With `timeout`, a wait for the peer's bytes that lasts that long fails with
    /// [`NoProgress`](crate::NoProgress) (kind `TimedOut`), as on a plaintext channel.
    pub(crate) fn read(&self, buf: &mut [u8], cancel: &CancelToken, timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            cancel.check()?;
            self.check_failed()?;
            let mut c = self.lock()?;
            match c.reader().read(buf) {
                Ok(n) => return self.got(n, cancel),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return self.got(0, cancel),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.session_error(e.to_string())),
            }
            match c.read_tls(&mut Fd(&self.fd)) {
                Ok(0) => {
                    // End of the connection: what rustls holds is all there is.
                    return match c.reader().read(buf) {
                        Ok(n) => self.got(n, cancel),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.got(0, cancel),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.got(0, cancel),
                        Err(e) => Err(self.session_error(e.to_string())),
                    };
                }
                Ok(_) => {
                    if let Err(e) = c.process_new_packets() {
                        send_queued(&mut c, &self.fd);
                        return Err(self.session_error(explain(&e, Some(&self.dir))));
                    }
                    // Anything the records asked us to send (best effort; a writer
                    // thread's flush sends the rest).
                    send_queued(&mut c, &self.fd);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    if let Some(why) = self.pending_alert(&mut c) {
                        return Err(self.session_error(why));
                    }
                    return Err(self.broken(e));
                }
            }
            drop(c);
            wait_progress(cancel, &self.fd, PollFlags::POLLIN, timeout, "read")?;
        }
    }

    /// Encrypt and send all of `data`; blocks until it is on the socket or cancel
    /// (or, with `timeout`, until the socket took nothing for that long).
    pub(crate) fn write_all(&self, mut data: &[u8], cancel: &CancelToken, timeout: Option<Duration>) -> io::Result<()> {
        while !data.is_empty() {
            cancel.check()?;
            self.check_failed()?;
            let n = self.lock()?.writer().write(data).map_err(|e| self.session_error(e.to_string()))?;
            data = &data[n..];
            self.flush(cancel, timeout)?;
        }
        Ok(())
    }

    /// Write some of `data` (up to [`WRITE_CHUNK`]), returning how much.
    pub(crate) fn write(&self, data: &[u8], cancel: &CancelToken, timeout: Option<Duration>) -> io::Result<usize> {
        let n = data.len().min(WRITE_CHUNK);
        self.write_all(&data[..n], cancel, timeout)?;
        Ok(n)
    }

    /// Encrypt and send the bytes of `iov` (up to [`WRITE_CHUNK`]), copied out of
    /// them with volatile reads; returns how many were sent.
    ///
    /// # Safety
    /// Every iovec must describe memory that stays mapped and readable until the call returns.
    pub(crate) unsafe fn write_iovecs(
        &self,
        iov: &[libc::iovec],
        cancel: &CancelToken,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut staged = vec![0u8; total.min(WRITE_CHUNK)];
        let mut at = 0;
        for v in iov {
            if at == staged.len() {
                break;
            }
            let n = v.iov_len.min(staged.len() - at);
            // SAFETY: the caller guarantees the iovec is mapped and readable for the
            // call; a volatile view copies it without claiming it does not change.
            let slice = unsafe { vm_memory::VolatileSlice::new(v.iov_base.cast::<u8>(), n) };
            slice.copy_to(&mut staged[at..at + n]);
            at += n;
        }
        self.write_all(&staged[..at], cancel, timeout)?;
        Ok(at)
    }

    /// Send every TLS record queued; blocks (without the lock) while the socket is full.
    pub(crate) fn flush(&self, cancel: &CancelToken, timeout: Option<Duration>) -> io::Result<()> {
        loop {
            cancel.check()?;
            let mut c = self.lock()?;
            while c.wants_write() {
                match c.write_tls(&mut Fd(&self.fd)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if let Some(why) = self.pending_alert(&mut c) {
                            return Err(self.session_error(why));
                        }
                        return Err(self.broken(e));
                    }
                }
            }
            if !c.wants_write() {
                return Ok(());
            }
            drop(c);
            wait_progress(cancel, &self.fd, PollFlags::POLLOUT, timeout, "write")?;
        }
    }

    /// Send close_notify (the peer reads a clean end of stream), best effort.
    pub(crate) fn close_notify(&self, cancel: &CancelToken) {
        if let Ok(mut c) = self.lock() {
            c.send_close_notify();
        }
        let _ = self.flush(cancel, self.io_timeout);
    }

    /// The TLS protocol version agreed (for messages and tests).
    pub(crate) fn protocol(&self) -> Option<String> {
        self.lock().ok().and_then(|c| c.protocol_version()).map(|v| format!("{v:?}"))
    }

    /// The peer's certificate subject DN, when it presented one.
    pub(crate) fn peer_dn(&self) -> Option<String> {
        let c = self.lock().ok()?;
        let der = c.peer_certificates()?.first()?.clone();
        subject_dn(&der).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_in_gnutls_order_with_escapes() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "GB");
        dn.push(rcgen::DnType::OrganizationName, "Example, Inc");
        dn.push(rcgen::DnType::CommonName, "client one");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_dn(cert.der()).unwrap(), "C=GB,O=Example\\, Inc,CN=client one");
        assert!(subject_dn(b"not a certificate").is_err());
    }

    #[test]
    fn authz_is_exact_and_file_lines() {
        let a = TlsAuthz::new(["CN=a,O=x".to_string(), "  ".to_string()]);
        assert!(a.allows("CN=a,O=x"));
        assert!(!a.allows("CN=a"));
        assert_eq!(a.allowed().len(), 1);
        let dir = std::env::temp_dir().join(format!("qmig-authz-{}", std::process::id()));
        std::fs::write(&dir, "# allowed clients\nCN=a,O=x\n\nCN=b\n").unwrap();
        let f = TlsAuthz::from_file(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(f.allowed(), ["CN=a,O=x", "CN=b"]);
        assert!(TlsAuthz::from_file(Path::new("/nonexistent/authz")).is_err());
    }

    #[test]
    fn hostname_defaults_to_the_tcp_host() {
        let tcp: crate::MigrationUri = "tcp:127.0.0.1:4444".parse().unwrap();
        let unix: crate::MigrationUri = "unix:/tmp/x".parse().unwrap();
        assert_eq!(server_name(&tcp, None).unwrap(), "127.0.0.1");
        assert_eq!(server_name(&tcp, Some("dest.example")).unwrap(), "dest.example");
        assert_eq!(server_name(&unix, Some("dest.example")).unwrap(), "dest.example");
        assert!(server_name(&unix, None).unwrap_err().to_string().contains("no hostname"));
    }

    #[test]
    fn missing_credentials_name_the_file() {
        let e = TlsClient::load(Path::new("/nonexistent-qmig-creds"), true).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-qmig-creds"), "{e}");
        let dir = std::env::temp_dir().join(format!("qmig-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = TlsServer::load(&dir, false, None).unwrap_err();
        assert!(e.to_string().contains(SERVER_CERT), "{e}");
        let e = TlsClient::load(&dir, true).unwrap_err();
        assert!(e.to_string().contains(CA_CERT), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
