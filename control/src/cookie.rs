//! Migration cookies: what each phase tells the other side (libvirt's
//! `qemu_migration_cookie.c`, in JSON rather than XML).
//!
//! Required in every cookie: `host-uuid`, `hostname` (the sender's host), `name`,
//! `uuid` and `memory` (bytes) of the VM. Optional: `kind` (`qemu`/`vm`),
//! `running` (Begin: the source VM was running), `statistics` (Perform: the
//! source's final `query-migrate`; Finish: the destination's), `events` (the QMP
//! events the sender's agent saw in that phase, `NAME` or `MIGRATION:STATUS`).
//! Unknown fields are ignored; a missing required one is refused by name, and a
//! cookie from the receiver's own host UUID is refused.

use crate::host::HostInfo;
use crate::rpc::RpcError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The fields every cookie must carry.
pub const REQUIRED: &[&str] = &["host-uuid", "hostname", "name", "uuid", "memory"];

/// One cookie.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cookie {
    /// The sender's host UUID.
    pub host_uuid: String,
    /// The sender's hostname.
    pub hostname: String,
    /// The VM's name.
    pub name: String,
    /// The VM's UUID.
    pub uuid: String,
    /// The VM's memory size in bytes.
    pub memory: u64,
    /// The VM's kind (`qemu` or `vm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Begin: whether the source VM was running (a paused one stays paused on the destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    /// Perform (source) / Finish (destination): the final `query-migrate` statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<Value>,
    /// The QMP events the sender saw during its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
}

impl Cookie {
    /// A cookie from `host` about VM `name`/`uuid` of `memory` bytes.
    pub fn new(host: &HostInfo, name: &str, uuid: &str, memory: u64) -> Cookie {
        Cookie {
            host_uuid: host.host_uuid.clone(),
            hostname: host.hostname.clone(),
            name: name.to_string(),
            uuid: uuid.to_string(),
            memory,
            kind: None,
            running: None,
            statistics: None,
            events: None,
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads the cookie of phase `phase`: every required field present (else refused by
    /// name), unknown fields ignored, and not from `local`'s own host.
    pub fn parse(v: Option<&Value>, phase: &str, local: &HostInfo) -> Result<Cookie, RpcError> {
        let obj = match v {
            Some(Value::Object(o)) => o,
            Some(_) => return Err(RpcError::invalid(format!("the {phase} cookie is not an object"))),
            None => return Err(RpcError::invalid(format!("the {phase} cookie is missing"))),
        };
        if let Some(f) = REQUIRED.iter().find(|f| obj.get(**f).is_none_or(Value::is_null)) {
            return Err(RpcError::invalid(format!("the {phase} cookie lacks required field '{f}'")));
        }
        let c: Cookie = serde_json::from_value(Value::Object(obj.clone()))
            .map_err(|e| RpcError::invalid(format!("the {phase} cookie is malformed: {e}")))?;
        if c.host_uuid.eq_ignore_ascii_case(&local.host_uuid) {
            return Err(RpcError::op_invalid(format!(
                "Attempt to migrate guest to the same host {} ({} cookie from {})",
                c.host_uuid, phase, c.hostname
            )));
        }
        Ok(c)
    }

    /// Checks that the cookie is about VM `name` with `uuid`.
    pub fn check_vm(&self, phase: &str, name: &str, uuid: &str) -> Result<(), RpcError> {
        if self.name != name || !self.uuid.eq_ignore_ascii_case(uuid) {
            return Err(RpcError::invalid(format!(
                "the {phase} cookie is about VM {} ({}), not {name} ({uuid})",
                self.name, self.uuid
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host(u: &str) -> HostInfo {
        HostInfo { host_uuid: u.into(), hostname: "h".into() }
    }

    #[test]
    fn required_unknown_same_host() {
        let a = host("00000000-0000-0000-0000-00000000000a");
        let b = host("00000000-0000-0000-0000-00000000000b");
        let mut c = Cookie::new(&a, "g", "11111111-1111-1111-1111-111111111111", 64 << 20);
        c.running = Some(true);
        let mut v = c.to_json();
        v["future-field"] = json!({"x": 1});
        assert_eq!(Cookie::parse(Some(&v), "begin3", &b).expect("parse"), c);
        let e = Cookie::parse(Some(&v), "begin3", &a).expect_err("same host");
        assert!(e.desc.contains("same host"), "{e}");
        for f in REQUIRED {
            let mut w = v.clone();
            w.as_object_mut().expect("object").remove(*f);
            let e = Cookie::parse(Some(&w), "begin3", &b).expect_err("missing");
            assert!(e.desc.contains(&format!("'{f}'")), "{e}");
        }
        assert!(Cookie::parse(None, "begin3", &b).is_err());
        assert!(Cookie::parse(Some(&json!({"memory": "x"})), "begin3", &b).is_err());
        assert!(c.check_vm("p", "g", "11111111-1111-1111-1111-111111111111").is_ok());
        assert!(c.check_vm("p", "h", "11111111-1111-1111-1111-111111111111").is_err());
    }
}
