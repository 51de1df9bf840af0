//! `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` are read from the environment. Alone in its test binary,
//! because it sets process-wide variables.

use lora_trainer::models::hub::HubCache;
use lora_trainer::models::load::{BaseModel, LoadOptions};

#[test]
fn hf_hub_offline_stops_downloads_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", dir.path());
    let cache = HubCache::from_env();
    assert!(cache.is_offline());
    assert_eq!(cache.root(), Some(dir.path()));
    let err = BaseModel::open_path("someone/not-downloaded", &LoadOptions::default())
        .err()
        .expect("offline")
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE is set"), "{err}");
    assert!(err.contains("models--someone--not-downloaded"), "{err}");
}
