//! The maps on the call path, hashed with foldhash: std's SipHash was about 6% of a proxied
//! call's instructions (docs/performance.md). foldhash is seeded per process too, so keys a
//! client chooses cannot be made to collide ahead of time.

pub type Hasher = foldhash::fast::RandomState;
pub type HashMap<K, V> = std::collections::HashMap<K, V, Hasher>;
pub type DashMap<K, V> = dashmap::DashMap<K, V, Hasher>;
