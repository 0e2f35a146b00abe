//! The CLI's TLS flags (`--tls-creds`, `--tls-hostname`, `--tls-authz`,
//! `--tls-verify-peer`), QEMU's migration TLS parameters, shared by `send`,
//! `recv`, `demo` and `kvm-dest`.

use std::path::PathBuf;
use transports::{TlsAuthz, TlsParams};

/// TLS with QEMU's x509 credentials.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// TLS with the x509 credentials in DIR, QEMU's tls-creds-x509 layout: ca-cert.pem, server-cert.pem and server-key.pem (destination), client-cert.pem and client-key.pem (source).
    #[arg(long = "tls-creds", value_name = "DIR")]
    pub creds: Option<PathBuf>,
    /// The name checked in the destination's certificate (QEMU's tls-hostname; default: the host of a tcp: URI; needed on unix:).
    #[arg(long = "tls-hostname", value_name = "NAME", requires = "creds")]
    pub hostname: Option<String>,
    /// Destination: only clients whose certificate DN is this (as QEMU 7.2's tls-authz sees it: the certificate's RDNs in order, C=GB,O=Org,CN=host) get in. Repeat for several (a DN holds commas itself), or @FILE with one DN a line.
    #[arg(long = "tls-authz", value_name = "DN|@FILE", requires = "creds")]
    pub authz: Vec<String>,
    /// Verify the peer (QEMU's verify-peer): the destination requires a client certificate signed by the CA, the source checks the destination's certificate and name.
    #[arg(long = "tls-verify-peer", value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub verify_peer: String,
}

impl TlsArgs {
    /// The TLS parameters, or None without `--tls-creds`.
    pub fn params(&self) -> qmig::Result<Option<TlsParams>> {
        let Some(creds) = &self.creds else { return Ok(None) };
        let mut dns = Vec::new();
        for a in &self.authz {
            match a.strip_prefix('@') {
                Some(file) => {
                    let list = TlsAuthz::from_file(std::path::Path::new(file))
                        .map_err(|e| qmig::Error::Transport(e.into()))?;
                    dns.extend(list.allowed().iter().cloned());
                }
                None => dns.push(a.clone()),
            }
        }
        if !self.authz.is_empty() && dns.is_empty() {
            return Err(qmig::Error::Usage("--tls-authz: the allow-list is empty".into()));
        }
        Ok(Some(TlsParams {
            creds: creds.clone(),
            hostname: self.hostname.clone(),
            authz: (!self.authz.is_empty()).then(|| TlsAuthz::new(dns)),
            verify_peer: self.verify_peer == "on",
        }))
    }
}

/// The destination's flags for a child `qmig recv` / `kvm-dest` (the source keeps the hostname).
pub fn dest_args(tls: Option<&TlsParams>) -> Vec<String> {
    let Some(t) = tls else { return Vec::new() };
    let mut a = vec!["--tls-creds".to_string(), t.creds.display().to_string()];
    a.extend(["--tls-verify-peer".to_string(), if t.verify_peer { "on" } else { "off" }.to_string()]);
    for dn in t.authz.iter().flat_map(|z| z.allowed()) {
        a.extend(["--tls-authz".to_string(), dn.clone()]);
    }
    a
}
