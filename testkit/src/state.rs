//! Checks on the engine's state notifications.

use engine::state::{is_legal, MigrationStatus, Notification, Role};

/// Check that a sequence of notified states is a legal walk from `none`.
pub fn check_sequence(role: Role, seen: &[Notification]) -> Result<(), String> {
    let mut cur = MigrationStatus::None;
    for n in seen {
        if let Notification::State { from, to } = n {
            if *from != cur {
                return Err(format!("notification {from} -> {to} while the state was {cur}"));
            }
            if !is_legal(role, *from, *to) {
                return Err(format!("illegal {from} -> {to}"));
            }
            cur = *to;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationStatus::*;

    #[test]
    fn legal_and_illegal_walks() {
        let walk = |path: &[MigrationStatus]| -> Vec<Notification> {
            path.windows(2).map(|w| Notification::State { from: w[0], to: w[1] }).collect()
        };
        assert_eq!(check_sequence(Role::Source, &walk(&[None, Setup, Active, Completed])), Ok(()));
        assert!(check_sequence(Role::Source, &walk(&[None, Active])).is_err(), "setup first");
        assert!(check_sequence(Role::Destination, &walk(&[None, Active, Completed])).is_ok());
        let gap = [Notification::State { from: None, to: Setup }, Notification::State { from: Active, to: Completed }];
        assert!(check_sequence(Role::Source, &gap).is_err(), "not from the current state");
    }
}
