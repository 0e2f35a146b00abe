//! The identity an agent puts in its cookies: a host UUID and a hostname.
//!
//! As libvirt, two ends with the same host UUID are one host and a migration
//! between them is refused; `--host-uuid` lets two agents on one machine be two hosts.

use crate::rpc::RpcError;
use serde::{Deserialize, Serialize};

/// Where the host UUID comes from when none is given.
pub const MACHINE_ID: &str = "/etc/machine-id";

/// One host's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostInfo {
    /// The host UUID (lowercase, 8-4-4-4-12).
    pub host_uuid: String,
    /// The hostname.
    pub hostname: String,
}

impl HostInfo {
    /// `uuid` (checked) or else the one derived from [`MACHINE_ID`]; `hostname` or else the system's.
    pub fn resolve(uuid: Option<&str>, hostname: Option<&str>) -> Result<HostInfo, RpcError> {
        let host_uuid = match uuid {
            Some(u) => parse_uuid(u)?,
            None => {
                let id = std::fs::read_to_string(MACHINE_ID)
                    .map_err(|e| RpcError::system(format!("no --host-uuid given and {MACHINE_ID} unreadable"), e))?;
                from_machine_id(&id)?
            }
        };
        let hostname = match hostname {
            Some(h) if !h.is_empty() => h.to_string(),
            Some(_) => return Err(RpcError::invalid("the hostname must not be empty")),
            None => system_hostname(),
        };
        Ok(HostInfo { host_uuid, hostname })
    }
}

/// The system's hostname (`localhost` when it cannot be read).
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Checks a UUID's shape (8-4-4-4-12 hex digits) and lowercases it.
pub fn parse_uuid(s: &str) -> Result<String, RpcError> {
    let groups: Vec<&str> = s.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    if shape && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(RpcError::invalid(format!("'{s}' is not a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427")))
    }
}

/// The UUID spelling of a machine-id (32 hex digits, as systemd writes it).
pub fn from_machine_id(id: &str) -> Result<String, RpcError> {
    let id = id.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RpcError::invalid(format!("{MACHINE_ID}: '{id}' is not 32 hex digits")));
    }
    let id = id.to_ascii_lowercase();
    Ok(format!("{}-{}-{}-{}-{}", &id[..8], &id[8..12], &id[12..16], &id[16..20], &id[20..]))
}

/// A fresh random UUID (version 4), for a VM defined without one.
pub fn random_uuid() -> Result<String, RpcError> {
    let mut b = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").map_err(|e| RpcError::system("/dev/urandom", e))?;
    std::io::Read::read_exact(&mut f, &mut b).map_err(|e| RpcError::system("/dev/urandom", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert_eq!(
            from_machine_id("0123456789ABCDEF0123456789abcdef\n").expect("id"),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
        assert!(from_machine_id("xyz").is_err());
        assert!(parse_uuid("01234567-89ab-cdef-0123-456789abcdef").is_ok());
        assert!(parse_uuid("01234567-89ab-cdef-0123-456789abcde").is_err());
        let r = random_uuid().expect("random");
        assert_eq!(parse_uuid(&r).expect("shape"), r);
        let h = HostInfo::resolve(Some("01234567-89AB-cdef-0123-456789abcdef"), Some("a")).expect("resolve");
        assert_eq!(h.host_uuid, "01234567-89ab-cdef-0123-456789abcdef");
    }
}
