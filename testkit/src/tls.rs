//! Test PKIs for TLS, made at test time with rcgen: a CA and the certificates it
//! signs, written in QEMU's `tls-creds-x509` directory layout (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`), so
//! the same directory serves qmig and QEMU 7.2 (GnuTLS) at either end.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io;
use std::path::Path;

/// The DN (GnuTLS's writing, as in QEMU's tls-authz) of the client certificates [`Ca::client`] makes.
pub const CLIENT_DN: &str = "O=qmig test,CN=qmig-source";
/// The names the server certificates of [`Ca::server`] carry (subjectAltName).
pub const SERVER_NAMES: [&str; 3] = ["127.0.0.1", "localhost", "dest.qmig.test"];

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate's serial number (what a CRL lists).
    pub serial: Vec<u8>,
}

/// How long an issued certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// 2020-01-01 to 2049-12-31.
    Current,
    /// 2020-01-01 to 2021-01-01: expired.
    Expired,
}

/// A test certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn err(e: rcgen::Error) -> io::Error {
    io::Error::other(e)
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    dn
}

impl Ca {
    /// A fresh CA (ECDSA P-256) named `O=qmig test,CN=<cn>`.
    pub fn new(cn: &str) -> io::Result<Ca> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name = dn(cn, "qmig test");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let cert = p.self_signed(&key).map_err(err)?;
        Ok(Ca { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    fn issue(&self, cn: &str, names: &[&str], eku: ExtendedKeyUsagePurpose, validity: Validity) -> io::Result<Issued> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(err)?;
        p.distinguished_name = dn(cn, "qmig test");
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        // Unique in this process (the CA is too): a CRL names certificates by serial.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x1000);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let serial = [&[0x51u8][..], &std::process::id().to_be_bytes(), &n.to_be_bytes()].concat();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = match validity {
            Validity::Current => rcgen::date_time_ymd(2049, 12, 31),
            Validity::Expired => rcgen::date_time_ymd(2021, 1, 1),
        };
        let cert = p.signed_by(&key, &self.cert, &self.key).map_err(err)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), serial })
    }

    /// A CRL of this CA revoking `revoked` (PEM, as QEMU's `ca-crl.pem`), valid 2020 to 2049.
    pub fn crl(&self, revoked: &[&Issued]) -> io::Result<String> {
        let p = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2049, 12, 31),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|c| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&c.serial),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        p.signed_by(&self.cert, &self.key).map_err(err)?.pem().map_err(err)
    }

    /// A server certificate for `names` (subjectAltName; IP addresses become IP entries).
    pub fn server(&self, names: &[&str], validity: Validity) -> io::Result<Issued> {
        self.issue("qmig-destination", names, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// A client certificate with subject `O=qmig test,CN=<cn>`.
    pub fn client(&self, cn: &str, validity: Validity) -> io::Result<Issued> {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth, validity)
    }
}

/// Write a credentials directory: `ca-cert.pem` from `ca_pem`, and the server and
/// client pairs given.
pub fn write_dir(dir: &Path, ca_pem: &str, server: Option<&Issued>, client: Option<&Issued>) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca-cert.pem"), ca_pem)?;
    if let Some(s) = server {
        std::fs::write(dir.join("server-cert.pem"), &s.cert_pem)?;
        std::fs::write(dir.join("server-key.pem"), &s.key_pem)?;
    }
    if let Some(c) = client {
        std::fs::write(dir.join("client-cert.pem"), &c.cert_pem)?;
        std::fs::write(dir.join("client-key.pem"), &c.key_pem)?;
    }
    Ok(())
}

/// A complete directory for both ends: CA `qmig-test-ca`, a current server
/// certificate for [`SERVER_NAMES`] and a current client certificate [`CLIENT_DN`].
/// Returns the CA (to issue more).
pub fn good_dir(dir: &Path) -> io::Result<Ca> {
    let ca = Ca::new("qmig-test-ca")?;
    let server = ca.server(&SERVER_NAMES, Validity::Current)?;
    let client = ca.client("qmig-source", Validity::Current)?;
    write_dir(dir, &ca.cert_pem(), Some(&server), Some(&client))?;
    Ok(ca)
}
