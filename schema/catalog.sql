-- The catalog schema (deltastore/repo/catalog_schema.py's SCHEMA: an index, rebuilt rather than migrated; generated).
CREATE TABLE base_tensors (
base_id TEXT NOT NULL REFERENCES bases(id),
name TEXT NOT NULL,
dtype TEXT NOT NULL,
shape TEXT NOT NULL,
tensor_id TEXT NOT NULL,
sq_norm REAL,
PRIMARY KEY (base_id, name)
);
CREATE TABLE bases (
id TEXT PRIMARY KEY,
name TEXT UNIQUE,
tensor_count INTEGER NOT NULL,
bytes INTEGER NOT NULL,
source TEXT,
hub_id TEXT,
created TEXT NOT NULL,
record TEXT NOT NULL
);
CREATE TABLE entry_objects (
version INTEGER NOT NULL REFERENCES versions(key),
object INTEGER NOT NULL REFERENCES objects(key),
PRIMARY KEY (version, object)
) WITHOUT ROWID;
CREATE TABLE journal_objects (
journal_id TEXT NOT NULL REFERENCES journals(id),
object_id TEXT NOT NULL,
PRIMARY KEY (journal_id, object_id)
);
CREATE TABLE journals (
id TEXT PRIMARY KEY,
target TEXT NOT NULL,
version_id TEXT NOT NULL,
state TEXT NOT NULL,
plan TEXT NOT NULL,
created TEXT NOT NULL
);
CREATE TABLE metadata (
version_id TEXT NOT NULL REFERENCES versions(id),
key TEXT NOT NULL,
value TEXT NOT NULL,
PRIMARY KEY (version_id, key)
);
CREATE TABLE objects (
key INTEGER PRIMARY KEY,
digest BLOB NOT NULL UNIQUE,
size INTEGER NOT NULL,
raw_size INTEGER NOT NULL
);
CREATE TABLE pending (
token TEXT NOT NULL,
object_id TEXT NOT NULL,
pid INTEGER NOT NULL,
host TEXT NOT NULL,
created TEXT NOT NULL,
PRIMARY KEY (token, object_id)
);
CREATE TABLE stances (
name TEXT PRIMARY KEY,
created TEXT NOT NULL
);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tags (
stance TEXT NOT NULL REFERENCES stances(name),
name TEXT NOT NULL,
version_id TEXT NOT NULL REFERENCES versions(id),
created TEXT NOT NULL,
PRIMARY KEY (stance, name)
);
CREATE TABLE version_encodings (
version INTEGER NOT NULL REFERENCES versions(key),
encoding TEXT NOT NULL,
tensors INTEGER NOT NULL,
bytes INTEGER NOT NULL,
PRIMARY KEY (version, encoding)
) WITHOUT ROWID;
CREATE TABLE versions (
key INTEGER PRIMARY KEY,
id TEXT NOT NULL UNIQUE,
stance TEXT NOT NULL REFERENCES stances(name),
number INTEGER NOT NULL,
parent TEXT,
base_id TEXT NOT NULL REFERENCES bases(id),
encoding TEXT NOT NULL,
message TEXT NOT NULL,
created TEXT NOT NULL,
tensors INTEGER NOT NULL,
bytes INTEGER NOT NULL,
UNIQUE (stance, number)
);
CREATE INDEX entry_objects_object ON entry_objects(object);
CREATE INDEX journal_objects_object ON journal_objects(object_id);
CREATE INDEX pending_object ON pending(object_id);
