//! The model repository: where the served models' manifests live (the config's manifest list, or
//! every `models/*/manifest.toml`), and who may change what is served from it while the server
//! runs (Triton's model control modes).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, Manifest};

/// Who changes the served models while the server runs, as Triton names it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// Only the operator, by SIGHUP; the repository load and unload calls are refused.
    #[default]
    None,
    /// Also clients, with the repository load and unload calls (behind the API key if one is
    /// set).
    Explicit,
    /// The server itself, re-reading the repository every `repository_poll_secs`; the load and
    /// unload calls are refused, as Triton does.
    Poll,
}

impl std::fmt::Display for ModelControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Explicit => "explicit",
            Self::Poll => "poll",
        })
    }
}

/// The manifests a server serves from.
#[derive(Clone, Debug)]
pub struct Repository {
    /// Manifests named by the config; empty: every `manifest.toml` one level under `models_dir`.
    configured: Vec<PathBuf>,
    models_dir: PathBuf,
}

/// One manifest of the repository, read now.
pub struct Entry {
    pub path: PathBuf,
    /// The model's name: the manifest's, or its directory's when it does not parse.
    pub name: String,
    pub manifest: Result<Manifest, ConfigError>,
}

impl Repository {
    pub fn new(configured: Vec<PathBuf>, models_dir: PathBuf) -> Self {
        Self {
            configured,
            models_dir,
        }
    }

    /// The manifest files, sorted.
    pub fn paths(&self) -> Result<Vec<PathBuf>, ConfigError> {
        if !self.configured.is_empty() {
            return Ok(self.configured.clone());
        }
        let read_err = |source| ConfigError::Read {
            path: self.models_dir.clone(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.models_dir)
            .map_err(read_err)?
            .filter_map(|entry| Some(entry.ok()?.path().join("manifest.toml")))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        Ok(paths)
    }

    /// Every manifest, each read and validated now. A manifest naming a model that an earlier
    /// one already names is an error: one name, one model.
    pub fn scan(&self) -> Result<Vec<Entry>, ConfigError> {
        let mut entries: Vec<Entry> = Vec::new();
        for path in self.paths()? {
            let mut manifest = Manifest::load(&path);
            let name = match &manifest {
                Ok(m) => m.name.clone(),
                Err(_) => directory_name(&path),
            };
            if let Some(first) = entries
                .iter()
                .find(|e| e.name == name && e.manifest.is_ok())
            {
                manifest = Err(ConfigError::Invalid {
                    path: path.clone(),
                    message: format!(
                        "model '{name}' is already defined by {}",
                        first.path.display()
                    ),
                });
            }
            entries.push(Entry {
                path,
                name,
                manifest,
            });
        }
        Ok(entries)
    }
}

/// The name of the directory holding `manifest`: a model's name while its manifest is unreadable.
fn directory_name(manifest: &Path) -> String {
    manifest
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_manifest_is_listed_under_its_directory_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("broken")).unwrap();
        std::fs::write(dir.path().join("broken/manifest.toml"), "name = [").unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let repository = Repository::new(vec![], dir.path().to_path_buf());
        let entries = repository.scan().unwrap();
        assert_eq!(
            entries.len(),
            1,
            "a directory without a manifest is not a model"
        );
        assert_eq!(entries[0].name, "broken");
        assert!(entries[0].manifest.is_err());
    }

    #[test]
    fn a_second_manifest_for_one_model_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = "name = \"toy\"\nlabels = [\"a\", \"b\"]\nbaseline = \"v\"\n\n\
                        [input]\nchannels = 1\nheight = 8\nwidth = 8\nmean = [0.5]\nstd = [0.5]\n\n\
                        [[variants]]\nname = \"v\"\narch = \"resnet20\"\nweights = \"random\"\nrouting_weight = 1\n";
        for copy in ["a", "b"] {
            std::fs::create_dir(dir.path().join(copy)).unwrap();
            std::fs::write(dir.path().join(copy).join("manifest.toml"), manifest).unwrap();
        }
        let entries = Repository::new(vec![], dir.path().to_path_buf())
            .scan()
            .unwrap();
        assert_eq!(entries.len(), 2);
        assert!(
            entries[0].manifest.is_ok(),
            "{:?}",
            entries[0].manifest.as_ref().err()
        );
        let refused = entries[1].manifest.as_ref().unwrap_err().to_string();
        assert!(refused.contains("already defined by"), "{refused}");
    }
}
