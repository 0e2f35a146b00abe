//! Transports (filled by the transports issue).
