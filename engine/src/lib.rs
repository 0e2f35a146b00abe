//! Migration engine (filled by the engine issue).
