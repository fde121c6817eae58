// The page's history: every generated image with its parameters, in this browser's IndexedDB (nothing on the
// server). Bounded: beyond MAX_ENTRIES the oldest are dropped.

const DB_NAME = "image-generation";
const STORE = "images";
const MAX_ENTRIES = 200;

let database = null;

function open() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/** Runs `work(store)` in one transaction; resolves with the result of the request it returns, once committed. */
async function transaction(mode, work) {
  database ??= await open();
  return new Promise((resolve, reject) => {
    const tx = database.transaction(STORE, mode);
    const request = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request?.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

/** Stores an entry; returns its id. */
export async function add(entry) {
  const id = await transaction("readwrite", (store) => store.add(entry));
  const keys = await transaction("readonly", (store) => store.getAllKeys());
  if (keys.length > MAX_ENTRIES) {
    const oldest = keys.slice(0, keys.length - MAX_ENTRIES);
    await transaction("readwrite", (store) => store.delete(IDBKeyRange.upperBound(oldest.at(-1))));
  }
  return id;
}

/** Every entry, newest first. */
export async function all() {
  return ((await transaction("readonly", (store) => store.getAll())) || []).reverse();
}

export function get(id) {
  return transaction("readonly", (store) => store.get(id));
}

/** Puts deleted entries back, under their own ids (so in their places). */
export function restore(entries) {
  return transaction("readwrite", (store) => {
    let request = null;
    for (const entry of entries) request = store.put(entry);
    return request;
  });
}

export function remove(id) {
  return transaction("readwrite", (store) => store.delete(id));
}

export function clear() {
  return transaction("readwrite", (store) => store.clear());
}
