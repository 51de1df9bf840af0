//! Hugging Face hub ids: files in the standard local cache, downloaded when missing.
//!
//! The cache is the one Python's `huggingface_hub` uses (`$HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`; `models--org--name/snapshots/<revision>/<file>`, with
//! `refs/main` naming the revision), so a model downloaded for diffusers is reused as it is and
//! our downloads serve diffusers too. Files are only fetched when the cache lacks them, through
//! the blocking client of the `hf-hub` crate (0.4, ureq + rustls), which writes that same layout.
//! `HF_HUB_OFFLINE=1`, or a failed download, ends in an error that lists the missing files and
//! says where to put them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::Result;

/// The local Hugging Face hub cache, and whether this program may download into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    root: Option<PathBuf>,
    offline: bool,
    endpoint: Option<String>,
}

impl HubCache {
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; offline when `HF_HUB_OFFLINE` is set to a true value;
    /// `HF_ENDPOINT` replaces `https://huggingface.co` (a mirror).
    pub fn from_env() -> HubCache {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
            .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")));
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| is_true(&v));
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        HubCache {
            root,
            offline,
            endpoint,
        }
    }

    /// A cache rooted at `root` (the folder holding `models--org--name`), online.
    pub fn at(root: impl Into<PathBuf>) -> HubCache {
        HubCache {
            root: Some(root.into()),
            offline: false,
            endpoint: None,
        }
    }

    /// The same cache, never downloading when `offline`.
    pub fn with_offline(mut self, offline: bool) -> HubCache {
        self.offline = offline;
        self
    }

    /// The same cache, downloading from `endpoint` instead of `https://huggingface.co`.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> HubCache {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The cache folder, if one could be found.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Whether downloads are disabled.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The folder of `org/name` in the cache (`models--org--name`).
    fn repo_folder(&self, id: &str) -> Option<PathBuf> {
        Some(
            self.root
                .as_ref()?
                .join(format!("models--{}", id.replace('/', "--"))),
        )
    }

    /// The snapshot folder of `org/name` that `refs/main` points to, if downloaded.
    pub fn snapshot(&self, id: &str) -> Option<PathBuf> {
        let repo = self.repo_folder(id)?;
        let revision = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
        let folder = repo.join("snapshots").join(revision.trim());
        folder.is_dir().then_some(folder)
    }
}

/// `1`, `true`, `yes`, `on` (any case), as huggingface_hub reads its boolean variables.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// The files a repo holds, as far as this program can see them.
pub(crate) trait FileListing {
    /// Whether the file `path` (relative to the repo root, `/`-separated) exists.
    fn has(&self, path: &str) -> bool;
    /// The names of the files directly inside `folder` (`""` = the root).
    fn names_in(&self, folder: &str) -> Vec<String>;
}

/// A folder on disk (a diffusers folder or a cache snapshot).
pub(crate) struct LocalFolder<'a>(pub &'a Path);

impl FileListing for LocalFolder<'_> {
    fn has(&self, path: &str) -> bool {
        self.0.join(path).is_file()
    }

    fn names_in(&self, folder: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.0.join(folder)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }
}

/// The file list of a hub repo (its `siblings`).
pub(crate) struct RemoteFiles(pub BTreeSet<String>);

impl FileListing for RemoteFiles {
    fn has(&self, path: &str) -> bool {
        self.0.contains(path)
    }

    fn names_in(&self, folder: &str) -> Vec<String> {
        let prefix = if folder.is_empty() {
            String::new()
        } else {
            format!("{folder}/")
        };
        self.0
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_string)
            .collect()
    }
}

/// What a caller needs from a repo: given what the repo holds, the files to use, or a
/// description of what is missing. `read` gives the content of a file already available (to
/// follow a sharded checkpoint's index).
pub(crate) type FileChoice<'a> = dyn Fn(
        &dyn FileListing,
        &dyn Fn(&str) -> Option<String>,
    ) -> std::result::Result<Vec<String>, Vec<String>>
    + 'a;

/// The local snapshot folder of `id` holding every file `choose` asks for, downloading the
/// missing ones unless the cache is offline. `what` says what the files are for, in messages.
pub(crate) fn snapshot_with(
    id: &str,
    cache: &HubCache,
    what: &str,
    choose: &FileChoice,
) -> Result<PathBuf> {
    // Everything already in the cache: no network at all.
    let cached = cache.snapshot(id);
    let missing = match &cached {
        Some(folder) => {
            let local = LocalFolder(folder);
            let read = |path: &str| std::fs::read_to_string(folder.join(path)).ok();
            match choose(&local, &read) {
                Ok(_) => return Ok(folder.clone()),
                Err(missing) => missing,
            }
        }
        // Not in the cache: what an empty repo lacks is the list of standard files.
        None => choose(&RemoteFiles(BTreeSet::new()), &|_| None)
            .err()
            .unwrap_or_default(),
    };
    let unavailable = |reason: String, files: &[String]| -> crate::Error {
        ModelError::HubUnavailable {
            id: id.to_string(),
            reason,
            advice: advice(id, cache, what, files),
        }
        .into()
    };
    let Some(root) = cache.root() else {
        return Err(unavailable(
            "no Hugging Face cache folder: set HF_HOME (or HF_HUB_CACHE)".to_string(),
            &missing,
        ));
    };
    if cache.is_offline() {
        let reason = if cached.is_none() {
            format!("it is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set, so it cannot be downloaded", root.display())
        } else {
            format!(
                "the Hugging Face cache at {} lacks some of its files and HF_HUB_OFFLINE is set, so they cannot be downloaded",
                root.display()
            )
        };
        return Err(unavailable(reason, &missing));
    }
    download(id, cache, root, choose).map_err(|(reason, files)| {
        let files = if files.is_empty() { missing } else { files };
        unavailable(reason, &files)
    })
}

/// Downloads what `choose` asks for into the cache and returns the snapshot folder; on failure,
/// the reason and the files that were wanted.
fn download(
    id: &str,
    cache: &HubCache,
    root: &Path,
    choose: &FileChoice,
) -> std::result::Result<PathBuf, (String, Vec<String>)> {
    use hf_hub::api::sync::ApiBuilder;

    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(root.to_path_buf()))
        .with_progress(true)
        .with_retries(2);
    if let Some(endpoint) = &cache.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .map_err(|e| (format!("cannot start the download client: {e}"), vec![]))?;
    let repo = api.model(id.to_string());
    let info = repo.info().map_err(|e| {
        (
            format!("cannot list the repository's files on the hub ({e}); check the id, your network and, for a gated model, HF_TOKEN"),
            vec![],
        )
    })?;
    let remote = RemoteFiles(info.siblings.into_iter().map(|s| s.rfilename).collect());
    // A sharded checkpoint's index names its shards: fetch it first, then read it.
    let fetch = |file: &str| {
        repo.get(file)
            .map_err(|e| format!("downloading `{file}` failed: {e}"))
    };
    let read = |file: &str| {
        fetch(file)
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok())
    };
    let files = choose(&remote, &read).map_err(|missing| {
        (
            format!(
                "the repository does not hold the files of a Stable Diffusion diffusers model (missing: {})",
                missing.join(", ")
            ),
            missing.clone(),
        )
    })?;
    // Twice at most: a file downloaded under a newer revision moves `refs/main`, and the
    // files of the older snapshot are then fetched again under the new one.
    for _ in 0..2 {
        for file in &files {
            fetch(file).map_err(|reason| (reason, files.clone()))?;
        }
        if let Some(folder) = cache.snapshot(id) {
            if files.iter().all(|f| folder.join(f).is_file()) {
                return Ok(folder);
            }
        }
    }
    Err((
        "the repository changed while downloading; run again".to_string(),
        files,
    ))
}

/// How to get `files` of `id` into the cache by hand.
fn advice(id: &str, cache: &HubCache, what: &str, files: &[String]) -> String {
    let repo = cache
        .repo_folder(id)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("<cache>/models--{}", id.replace('/', "--")));
    let (these, listed) = if files.is_empty() {
        (format!("the {what}"), String::new())
    } else {
        (format!("these {what}"), format!(" {}", files.join(" ")))
    };
    let endpoint = cache
        .endpoint
        .as_deref()
        .unwrap_or("https://huggingface.co")
        .trim_end_matches('/');
    let online = if cache.is_offline() {
        "; or unset HF_HUB_OFFLINE and let this program download them"
    } else {
        ""
    };
    format!(
        "To fix it, download {these} from {endpoint}/{id}, for example with Python's \
         `huggingface-cli download {id}{listed}` (it fills the same cache); or copy them, keeping \
         their paths, into {repo}/snapshots/<any name>/ and write that name into \
         {repo}/refs/main{online}."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_values_follow_huggingface_hub() {
        for v in ["1", "true", "TRUE", "yes", "on"] {
            assert!(is_true(v), "{v}");
        }
        for v in ["0", "false", "", "no"] {
            assert!(!is_true(v), "{v}");
        }
    }

    #[test]
    fn remote_listings_see_one_folder_level() {
        let files = RemoteFiles(
            ["model_index.json", "unet/config.json", "unet/sub/x.bin"]
                .into_iter()
                .map(String::from)
                .collect(),
        );
        assert!(files.has("unet/config.json") && !files.has("unet/x"));
        assert_eq!(files.names_in("unet"), vec!["config.json".to_string()]);
        assert_eq!(files.names_in(""), vec!["model_index.json".to_string()]);
    }

    #[test]
    fn offline_misses_name_the_files_and_where_they_go() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HubCache::at(dir.path()).with_offline(true);
        let choose = |_: &dyn FileListing, _: &dyn Fn(&str) -> Option<String>| {
            Err(vec!["unet/config.json".to_string()])
        };
        let err = snapshot_with("org/name", &cache, "model files", &choose)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/name") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
        assert!(err.contains("models--org--name/refs/main"), "{err}");
        assert!(err.contains("huggingface-cli download org/name"), "{err}");
    }
}
