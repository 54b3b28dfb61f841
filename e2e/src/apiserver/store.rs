//! In-memory object storage with a global resourceVersion and an ordered event history
//! that watches resume from (410 Gone past its start).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tokio::sync::broadcast;

/// How many past events a watch can resume from.
const HISTORY: usize = 20_000;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The watch event `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, in resourceVersion order.
#[derive(Debug, Clone)]
pub struct Event {
    /// resourceVersion the change produced.
    pub rv: u64,
    /// Storage key of the resource (`group/plural`).
    pub resource: String,
    /// Kind of change.
    pub kind: EventType,
    /// The object after the change (before it, for deletions).
    pub object: Value,
    /// The object before the change (modifications).
    pub old: Option<Value>,
}

/// Key of one object: resource, namespace (empty when cluster-scoped), name.
pub type Key = (String, String, String);

struct Inner {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
}

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(8192);
        Self {
            inner: Mutex::new(Inner {
                objects: BTreeMap::new(),
                rv: 1,
                history: VecDeque::new(),
            }),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, key: &Key) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    /// Objects of a resource (in one namespace, or all when `ns` is None), with the rv.
    pub fn list(&self, resource: &str, ns: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((r, n, _), _)| r == resource && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// Writes `obj` at `key` under `check`, which sees the current object and may refuse
    /// (optimistic concurrency) or return the object to store. Returns the stored object.
    pub fn write<E>(
        &self,
        key: &Key,
        check: impl FnOnce(Option<&Value>) -> Result<Option<Value>, E>,
    ) -> Result<Option<Value>, E> {
        let mut inner = self.lock();
        let old = inner.objects.get(key).cloned();
        let Some(mut new) = check(old.as_ref())? else {
            // Removal.
            if let Some(mut old) = old {
                inner.rv += 1;
                let rv = inner.rv;
                inner.objects.remove(key);
                old["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                self.publish(&mut inner, key, EventType::Deleted, old.clone(), None);
                return Ok(Some(old));
            }
            return Ok(None);
        };
        inner.rv += 1;
        let rv = inner.rv;
        new["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        inner.objects.insert(key.clone(), new.clone());
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.publish(&mut inner, key, kind, new.clone(), old);
        Ok(Some(new))
    }

    fn publish(
        &self,
        inner: &mut Inner,
        key: &Key,
        kind: EventType,
        object: Value,
        old: Option<Value>,
    ) {
        let ev = Arc::new(Event {
            rv: inner.rv,
            resource: key.0.clone(),
            kind,
            object,
            old,
        });
        if inner.history.len() == HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(ev.clone());
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    /// Starts a watch: the events after `since` (Err with the oldest resumable rv when
    /// `since` is too old) and a receiver for everything after them, without gap.
    #[allow(clippy::type_complexity)]
    pub fn watch(
        &self,
        since: u64,
    ) -> Result<(Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>), u64> {
        let inner = self.lock();
        let oldest = inner.history.front().map_or(inner.rv, |e| e.rv);
        if since + 1 < oldest && since < inner.rv {
            return Err(oldest);
        }
        let past = inner
            .history
            .iter()
            .filter(|e| e.rv > since)
            .cloned()
            .collect();
        Ok((past, self.tx.subscribe()))
    }

    /// The objects of a resource and a receiver of every later change, atomically (a watch
    /// without resourceVersion starts with the current state).
    pub fn snapshot_watch(
        &self,
        resource: &str,
    ) -> (Vec<Value>, u64, broadcast::Receiver<Arc<Event>>) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv, self.tx.subscribe())
    }

    /// Every stored object (for cascading deletion and namespace cleanup).
    pub fn all(&self) -> Vec<(Key, Value)> {
        self.lock()
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
