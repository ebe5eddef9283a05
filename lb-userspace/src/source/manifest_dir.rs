//! `--source dir:PATH`: Services and EndpointSlices from manifest files under a directory.
//!
//! Every `.yaml`, `.yml` and `.json` file under PATH is read, recursively; hidden files and
//! directories (names starting with `.`) and editor leftovers (`~`, `.swp`) are not. A file may
//! hold several YAML documents, and a document may be a List, exactly as
//! `kubectl get svc,endpointslices -A -o yaml` prints one. Kinds other than `Service` (v1),
//! `EndpointSlice` (discovery.k8s.io/v1) and `Node` (v1: the agent reads its own node's zone
//! label from it, as from the API server) are ignored.
//!
//! It loses nothing: a broken file or object never stops the others from loading, and an object
//! that was good is served in its last good version while its definition, or its whole file, is
//! broken (someone is mid-edit). An object is gone only when it is deleted from a file that
//! parses, or its file is deleted.
//!
//! Rescans are incremental: a file is re-read only when its modification time, size or inode
//! changed, so a directory of thousands of services rescans cheaply. (Two writes of the same
//! size within one kernel clock tick look like one; editors that save by renaming get a new
//! inode every time.)
//!
//! The directory is symlink-friendly, as a mounted ConfigMap is: links to files and directories
//! are followed, and the `..data` directories such a mount keeps are skipped as hidden.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use tokio::sync::mpsc;

use crate::model::{ObjectKind, ObjectRef, DEFAULT_NAMESPACE};

#[cfg(test)]
mod tests;

/// The Services and EndpointSlices defined in a directory of manifest files.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    /// What each file read so far contributes, in path order.
    files: BTreeMap<PathBuf, FileState>,
    /// The objects the last scan produced, which are each object's last good version.
    current: BTreeMap<ObjectRef, Object>,
    scanned: bool,
}

/// The result of one scan: the whole current set of objects, not a difference.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Every Service, sorted by namespace and name.
    pub services: Vec<Service>,
    /// Every EndpointSlice, sorted by namespace and name.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Every Node, sorted by name.
    pub nodes: Vec<Node>,
    /// Every problem in the directory now, including those in files this scan had no need to
    /// re-read, in path order. Compare with the previous scan's to report only what is new.
    pub errors: Vec<ManifestError>,
    /// Whether any object differs from the previous scan's (always true for the first scan).
    pub changed: bool,
    /// How many files this scan read; the others had not changed.
    pub files_read: usize,
}

/// Where in the directory an object is defined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// Which YAML document of the file, counting from 1 as an editor would (a JSON file is one
    /// document).
    pub document: usize,
    /// The index in `items`, counting from 0, when the document is a List.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.path.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        Ok(())
    }
}

/// A problem with one file or object. It never stops the rest of the directory from loading.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot list {}: {reason}; keeping the objects its files defined", path.display())]
    ListDir { path: PathBuf, reason: String },
    #[error("cannot read {}: {reason}; keeping the objects it defined", path.display())]
    ReadFile { path: PathBuf, reason: String },
    #[error(
        "{} document {document} is not valid {format}: {reason}; the file is not read past \
         it{}",
        path.display(),
        kept_note(*kept)
    )]
    Syntax {
        path: PathBuf,
        document: usize,
        format: &'static str,
        reason: String,
        /// How many objects the file defined before that are kept.
        kept: usize,
    },
    #[error("{location}: {object}: {reason}; {}", if *kept_last_good {
        "serving its last good version until it is fixed"
    } else {
        "not loaded"
    })]
    Object {
        location: Location,
        object: ObjectRef,
        reason: String,
        /// Whether its last good version is still served.
        kept_last_good: bool,
    },
    #[error("{location}: {reason}; not loaded")]
    Unidentified { location: Location, reason: String },
    #[error("{object} is defined twice, in {first} and in {second}; using the first, remove one")]
    Duplicate {
        object: ObjectRef,
        first: Location,
        second: Location,
    },
}

fn kept_note(kept: usize) -> String {
    match kept {
        0 => String::new(),
        1 => "; keeping the object it defined before until it is fixed".to_owned(),
        n => format!("; keeping the {n} objects it defined before until it is fixed"),
    }
}

/// Why a manifest directory cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error(
        "manifest directory {} does not exist; create it or fix --source dir:PATH",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error(
        "{} is not a directory; --source dir:PATH needs a directory of manifest files",
        path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error("cannot access manifest directory {}: {source}", path.display())]
    Inaccessible {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch manifest directory {} for changes: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Watches everything under `path` and sends `()` on the returned channel when something there
/// changed, so the caller can rescan. The channel holds one signal at most: a burst of changes
/// while the caller is busy leaves one signal pending, not one per change. Signals stop when
/// the watcher is dropped.
pub fn watch(path: &Path) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), DirError> {
    check_dir(path)?;
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // Reading files, as every scan does, changes nothing.
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => return,
            Ok(_) => {}
            // Events may have been lost (e.g. inotify queue overflow): rescan to be sure.
            Err(err) => log::warn!("watching manifests: {err}; rescanning"),
        }
        // A full channel already holds a signal, and a closed one has nobody to tell.
        let _ = tx.try_send(());
    })
    .map_err(|source| DirError::Watch {
        path: path.to_owned(),
        source,
    })?;
    watcher
        .watch(path, RecursiveMode::Recursive)
        .map_err(|source| DirError::Watch {
            path: path.to_owned(),
            source,
        })?;
    Ok((watcher, rx))
}

impl ManifestDir {
    /// A source reading the directory at `root`; nothing is read until [`ManifestDir::scan`].
    pub fn new(root: impl Into<PathBuf>) -> Result<ManifestDir, DirError> {
        let root = root.into();
        check_dir(&root)?;
        Ok(ManifestDir {
            root,
            files: BTreeMap::new(),
            current: BTreeMap::new(),
            scanned: false,
        })
    }

    /// The directory this source reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads what changed since the last scan and returns the whole current set of objects.
    pub fn scan(&mut self) -> Scan {
        let listing = list(&self.root);
        let mut errors = listing.errors;
        let mut files_read = 0;

        // A file is gone only when its directory could be listed and it was not there.
        let known = self.files.len();
        self.files.retain(|path, _| {
            listing.files.contains_key(path)
                || listing.unlisted.iter().any(|dir| path.starts_with(dir))
        });
        let mut touched = self.files.len() != known;
        for (path, stamp) in listing.files {
            let previous = self.files.get(&path);
            let state = match stamp {
                Ok(stamp) if previous.is_some_and(|p| p.stamp == Some(stamp)) => continue,
                Ok(stamp) => {
                    files_read += 1;
                    read_file(&path, stamp, previous, &self.current)
                }
                Err(reason) => FileState::unreadable(&path, reason, previous),
            };
            self.files.insert(path, state);
            touched = true;
        }

        // In path order, then document order, the first definition of an object wins.
        let mut winners: BTreeMap<&ObjectRef, &Defined> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for state in self.files.values() {
            errors.extend(state.errors.iter().cloned());
            for defined in &state.defined {
                match winners.entry(&defined.key) {
                    Entry::Vacant(entry) => {
                        entry.insert(defined);
                    }
                    Entry::Occupied(first) => duplicates.push(ManifestError::Duplicate {
                        object: defined.key.clone(),
                        first: first.get().location.clone(),
                        second: defined.location.clone(),
                    }),
                }
            }
        }
        errors.extend(duplicates);

        // Untouched files make the same winners: skip comparing thousands of objects.
        let same = !touched
            || (winners.len() == self.current.len()
                && winners.iter().zip(&self.current).all(
                    |((key, defined), (current_key, current))| {
                        *key == current_key && defined.object == *current
                    },
                ));
        let changed = !self.scanned || !same;
        if !same {
            self.current = winners
                .into_iter()
                .map(|(key, defined)| (key.clone(), defined.object.clone()))
                .collect();
        }
        self.scanned = true;

        let mut scan = Scan {
            errors,
            changed,
            files_read,
            ..Scan::default()
        };
        for object in self.current.values() {
            match object {
                Object::Service(service) => scan.services.push(Service::clone(service)),
                Object::EndpointSlice(slice) => {
                    scan.endpoint_slices.push(EndpointSlice::clone(slice))
                }
                Object::Node(node) => scan.nodes.push(Node::clone(node)),
            }
        }
        scan
    }
}

fn check_dir(path: &Path) -> Result<(), DirError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(DirError::NotADirectory {
            path: path.to_owned(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(DirError::Missing {
            path: path.to_owned(),
        }),
        Err(source) => Err(DirError::Inaccessible {
            path: path.to_owned(),
            source,
        }),
    }
}

/// An object read from a manifest (boxed: a Service is twice the size of a slice).
#[derive(Clone, Debug, PartialEq)]
enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// An object and where it is defined.
#[derive(Clone, Debug)]
struct Defined {
    key: ObjectRef,
    location: Location,
    object: Object,
}

/// What one file contributes.
#[derive(Debug)]
struct FileState {
    /// The file's stamp when it was read; `None` when reading failed, to retry every scan.
    stamp: Option<Stamp>,
    /// Its objects in document order, including last good versions kept for broken ones.
    defined: Vec<Defined>,
    errors: Vec<ManifestError>,
}

impl FileState {
    /// A file that cannot be read: keep what it defined before.
    fn unreadable(path: &Path, reason: String, previous: Option<&FileState>) -> FileState {
        FileState {
            stamp: None,
            defined: previous.map(|p| p.defined.clone()).unwrap_or_default(),
            errors: vec![ManifestError::ReadFile {
                path: path.to_owned(),
                reason,
            }],
        }
    }
}

/// What tells that a file changed without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        }
    }
}

/// The manifest files under a directory.
#[derive(Default)]
struct Listing {
    /// Each file's stamp, or why it could not be had (e.g. a dangling symlink).
    files: BTreeMap<PathBuf, Result<Stamp, String>>,
    /// Directories that could not be listed: the files known under them are kept.
    unlisted: Vec<PathBuf>,
    errors: Vec<ManifestError>,
}

fn list(root: &Path) -> Listing {
    let mut listing = Listing::default();
    list_dir(root, &mut listing, &mut HashSet::new());
    listing
}

fn list_dir(dir: &Path, listing: &mut Listing, visited: &mut HashSet<PathBuf>) {
    // Directory symlinks are followed, so a loop of them must be stopped.
    if let Ok(canonical) = fs::canonicalize(dir) {
        if !visited.insert(canonical) {
            return;
        }
    }
    let mut unlisted = |reason: std::io::Error| {
        listing.unlisted.push(dir.to_owned());
        listing.errors.push(ManifestError::ListDir {
            path: dir.to_owned(),
            reason: reason.to_string(),
        });
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => return unlisted(err),
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => names.push(entry.file_name()),
            Err(err) => return unlisted(err),
        }
    }
    for name in names {
        let path = dir.join(&name);
        let name = name.to_string_lossy();
        if is_ignored(&name) {
            continue;
        }
        // `metadata` follows symlinks: a mounted ConfigMap's files are links into `..data`.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => list_dir(&path, listing, visited),
            Ok(meta) if meta.is_file() && is_manifest(&path) => {
                listing.files.insert(path, Ok(Stamp::of(&meta)));
            }
            Ok(_) => {}
            Err(err) if is_manifest(&path) => {
                listing.files.insert(path, Err(err.to_string()));
            }
            Err(_) => {}
        }
    }
}

/// Hidden files and directories, and editors' backup and swap files.
fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp")
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| {
            ["yaml", "yml", "json"]
                .iter()
                .any(|m| ext.eq_ignore_ascii_case(m))
        })
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"))
}

/// Reads and parses one file. `previous` is what it contributed before, `last_good` every
/// object's last good version.
fn read_file(
    path: &Path,
    stamp: Stamp,
    previous: Option<&FileState>,
    last_good: &BTreeMap<ObjectRef, Object>,
) -> FileState {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => return FileState::unreadable(path, err.to_string(), previous),
    };
    let format = if is_json(path) { "JSON" } else { "YAML" };
    let (documents, syntax_error) = parse_documents(&text, format);

    let mut loader = Loader {
        last_good,
        defined: Vec::new(),
        errors: Vec::new(),
    };
    for (index, document) in documents.into_iter().enumerate() {
        let location = Location {
            path: path.to_owned(),
            document: index + 1,
            item: None,
        };
        loader.document(document, location);
    }

    if let Some((document, reason)) = syntax_error {
        // What follows the error cannot be read, so the objects the file defined before and
        // that are not in the part before the error may still be there: keep them.
        let read: HashSet<&ObjectRef> = loader.defined.iter().map(|d| &d.key).collect();
        let kept: Vec<Defined> = previous
            .into_iter()
            .flat_map(|p| &p.defined)
            .filter(|d| !read.contains(&d.key))
            .cloned()
            .collect();
        loader.errors.insert(
            0,
            ManifestError::Syntax {
                path: path.to_owned(),
                document,
                format,
                reason,
                kept: kept.len(),
            },
        );
        loader.defined.extend(kept);
    }
    FileState {
        stamp: Some(stamp),
        defined: loader.defined,
        errors: loader.errors,
    }
}

/// The documents of a file up to the first syntax error, and that error with the 1-based
/// index of the document it is in.
fn parse_documents(text: &str, format: &str) -> (Vec<Value>, Option<(usize, String)>) {
    if format == "JSON" {
        return match serde_json::from_str::<Value>(text) {
            Ok(document) => (vec![document], None),
            Err(err) => (Vec::new(), Some((1, err.to_string()))),
        };
    }
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        match Value::deserialize(document) {
            Ok(value) => documents.push(value),
            // The parser cannot resynchronise after an error: it would repeat it forever.
            Err(err) => {
                let index = documents.len() + 1;
                return (documents, Some((index, err.to_string())));
            }
        }
    }
    (documents, None)
}

/// Turns a file's documents into objects and errors.
struct Loader<'a> {
    last_good: &'a BTreeMap<ObjectRef, Object>,
    defined: Vec<Defined>,
    errors: Vec<ManifestError>,
}

impl Loader<'_> {
    fn document(&mut self, document: Value, location: Location) {
        match str_field(&document, "kind") {
            // An empty document, as after a trailing `---`.
            _ if document.is_null() => {}
            Some(kind) if kind.ends_with("List") => self.list(document, location),
            _ => self.object(document, location, None),
        }
    }

    /// A List: `kind: List` as kubectl prints it, whose items say what they are, or a typed
    /// list as the API returns it (`kind: ServiceList`), whose items do not.
    fn list(&mut self, list: Value, location: Location) {
        let list_kind = str_field(&list, "kind").unwrap_or_default().to_owned();
        let item_kind = list_kind.strip_suffix("List").filter(|k| !k.is_empty());
        let defaults = item_kind.map(|kind| TypeMeta {
            kind: kind.to_owned(),
            api_version: str_field(&list, "apiVersion").map(str::to_owned),
        });
        let Value::Mapping(mut list) = list else {
            return;
        };
        match list.remove("items") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (index, item) in items.into_iter().enumerate() {
                    let location = Location {
                        item: Some(index),
                        ..location.clone()
                    };
                    self.object(item, location, defaults.as_ref());
                }
            }
            Some(_) => self.errors.push(ManifestError::Unidentified {
                location,
                reason: format!("the {list_kind}'s items are not a sequence"),
            }),
        }
    }

    /// One object; `defaults` fills in kind and apiVersion for the items of a typed list.
    fn object(&mut self, object: Value, location: Location, defaults: Option<&TypeMeta>) {
        let unidentified = |reason: String| ManifestError::Unidentified {
            location: location.clone(),
            reason,
        };
        let Value::Mapping(mut object) = object else {
            let error =
                unidentified("not an object (a mapping with apiVersion, kind and metadata)".into());
            return self.errors.push(error);
        };
        let kind = match object.get("kind").and_then(Value::as_str) {
            Some(kind) => kind,
            None => match defaults {
                Some(defaults) => &defaults.kind,
                None => {
                    return self
                        .errors
                        .push(unidentified("the object has no kind".into()))
                }
            },
        };
        let kind = match kind {
            "Service" => ObjectKind::Service,
            "EndpointSlice" => ObjectKind::EndpointSlice,
            "Node" => ObjectKind::Node,
            other => {
                log::debug!("{location}: ignoring a {other}");
                return;
            }
        };
        let metadata = object.get("metadata");
        let name = metadata
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty());
        let Some(name) = name else {
            let error = unidentified(format!("the {kind} has no metadata.name"));
            return self.errors.push(error);
        };
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = ObjectRef {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };

        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .or(defaults.and_then(|d| d.api_version.as_deref()));
        let converted = if api_version == Some(kind.api_version()) {
            // The type's own checks need kind and apiVersion, consumers need the namespace.
            object.insert("apiVersion".into(), kind.api_version().into());
            object.insert("kind".into(), kind.as_str().into());
            if let Some(Value::Mapping(metadata)) = object.get_mut("metadata") {
                if kind.namespaced() {
                    metadata.insert("namespace".into(), key.namespace.as_str().into());
                }
            }
            convert(kind, object)
        } else {
            Err(format!(
                "apiVersion {:?} is not supported; use {}",
                api_version.unwrap_or_default(),
                kind.api_version()
            ))
        };

        match converted {
            Ok(object) => self.defined.push(Defined {
                key,
                location,
                object,
            }),
            Err(reason) => {
                let last_good = self.last_good.get(&key);
                self.errors.push(ManifestError::Object {
                    location: location.clone(),
                    object: key.clone(),
                    reason,
                    kept_last_good: last_good.is_some(),
                });
                if let Some(object) = last_good {
                    self.defined.push(Defined {
                        key,
                        location,
                        object: object.clone(),
                    });
                }
            }
        }
    }
}

/// A typed list's `kind` and `apiVersion` for its items.
struct TypeMeta {
    kind: String,
    api_version: Option<String>,
}

fn str_field<'v>(value: &'v Value, field: &str) -> Option<&'v str> {
    value.get(field).and_then(Value::as_str)
}

fn convert(kind: ObjectKind, object: Mapping) -> Result<Object, String> {
    let object = Value::Mapping(object);
    match kind {
        ObjectKind::Service => typed(&object).map(|s| Object::Service(Box::new(s))),
        ObjectKind::EndpointSlice => typed(&object).map(|s| Object::EndpointSlice(Box::new(s))),
        ObjectKind::Node => typed(&object).map(|n| Object::Node(Box::new(n))),
    }
}

fn typed<T: DeserializeOwned>(object: &Value) -> Result<T, String> {
    T::deserialize(object).map_err(|err| conversion_error::<T>(object, err))
}

/// Why `object` is not a `T`, naming the field. Errors from a `Value` do not say which field
/// (serde_yaml tracks the path only while parsing text), so the object is printed and parsed
/// again to learn it, e.g. `spec.ports[0].port: invalid type: string "abc", expected i32`.
/// Line numbers of that text mean nothing to the user and are cut off.
fn conversion_error<T: DeserializeOwned>(object: &Value, err: serde_yaml::Error) -> String {
    let Ok(text) = serde_yaml::to_string(object) else {
        return err.to_string();
    };
    match serde_yaml::from_str::<T>(&text) {
        Ok(_) => err.to_string(),
        Err(with_path) => {
            let message = with_path.to_string();
            let position = with_path
                .location()
                .map(|at| format!(" at line {} column {}", at.line(), at.column()));
            match position.and_then(|p| message.strip_suffix(&p).map(str::to_owned)) {
                Some(without_position) => without_position,
                None => message,
            }
        }
    }
}
