//! Where Services and EndpointSlices come from: `--source dir:PATH` reads manifest files from a
//! directory ([`manifest_dir`]); `--source kube` watches the API server ([`kube`]).

pub mod kube;
pub mod manifest_dir;

use std::fmt;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use std::path::PathBuf;
use std::str::FromStr;

/// One consistent view of everything the model reads, whichever source it comes from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    /// Every Service, sorted by namespace and name.
    pub services: Vec<Service>,
    /// Every EndpointSlice, sorted by namespace and name.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// This node's own Node object, when the source has it: its zone label
    /// (`topology.kubernetes.io/zone`) is what topology-aware routing compares hints with.
    pub node: Option<Node>,
}

/// Where the agent reads Services and EndpointSlices from (`--source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `dir:PATH`: manifest files under PATH, re-read when they change.
    Dir(PathBuf),
    /// `kube`: watches the API server. `kubeconfig` is not part of the `--source` argument (it
    /// comes from `--kubeconfig`): parsing gives `None`, which means the pod's service account.
    Kube { kubeconfig: Option<PathBuf> },
}

/// A `--source` argument that names no source this agent has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceArgError {
    #[error(
        "--source dir: needs a path after the colon, e.g. --source dir:/etc/lb-agent/manifests"
    )]
    EmptyPath,
    #[error("--source {given:?} is not a source; accepted forms: dir:PATH, kube")]
    Unknown { given: String },
}

impl FromStr for Source {
    type Err = SourceArgError;

    fn from_str(arg: &str) -> Result<Source, SourceArgError> {
        if let Some(path) = arg.strip_prefix("dir:") {
            return match path {
                "" => Err(SourceArgError::EmptyPath),
                path => Ok(Source::Dir(PathBuf::from(path))),
            };
        }
        match arg {
            "kube" => Ok(Source::Kube { kubeconfig: None }),
            _ => Err(SourceArgError::Unknown {
                given: arg.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dir(path) => write!(f, "dir:{}", path.display()),
            // As `--source` spells it: the kubeconfig comes from a flag of its own.
            Source::Kube { .. } => f.write_str("kube"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_source_arguments() {
        let cases: [(&str, Result<Source, SourceArgError>); 7] = [
            (
                "dir:/etc/manifests",
                Ok(Source::Dir("/etc/manifests".into())),
            ),
            ("dir:relative/path", Ok(Source::Dir("relative/path".into()))),
            ("dir:", Err(SourceArgError::EmptyPath)),
            ("kube", Ok(Source::Kube { kubeconfig: None })),
            (
                "kube:/etc/kubeconfig",
                Err(SourceArgError::Unknown {
                    given: "kube:/etc/kubeconfig".into(),
                }),
            ),
            (
                "/etc/manifests",
                Err(SourceArgError::Unknown {
                    given: "/etc/manifests".into(),
                }),
            ),
            (
                "file:/x",
                Err(SourceArgError::Unknown {
                    given: "file:/x".into(),
                }),
            ),
        ];
        for (arg, want) in cases {
            assert_eq!(arg.parse::<Source>(), want, "--source {arg}");
        }
    }

    #[test]
    fn errors_list_the_accepted_forms() {
        let unknown = "nope".parse::<Source>().unwrap_err().to_string();
        assert!(unknown.contains("dir:PATH, kube"), "{unknown}");
    }

    #[test]
    fn displays_as_it_parses() {
        for arg in ["dir:/etc/manifests", "kube"] {
            let source: Source = arg.parse().unwrap();
            assert_eq!(source.to_string(), arg);
        }
        let with_kubeconfig = Source::Kube {
            kubeconfig: Some("/etc/kubeconfig".into()),
        };
        assert_eq!(with_kubeconfig.to_string(), "kube");
    }
}
