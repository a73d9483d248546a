import CSQLite
import Foundation

/// The layer store's metadata database: SQLite, the only file that imports CSQLite.
///
/// SQLite gives what the store needs from an embedded store: atomic multi-row transactions
/// that survive a crash (rollback journal in WAL mode, `synchronous=FULL`), and safe access
/// from several processes (the CLI and a mount daemon) through its own file locks, waiting
/// up to `busyTimeout` for a writer.
///
/// A class owns the `sqlite3 *` and closes it in `deinit`; statements are finalized before
/// their function returns. Every return code goes through `check`, which throws with the
/// statement and SQLite's message.
final class LayerDatabase: @unchecked Sendable {
    enum Value: Equatable, Sendable {
        case null
        case integer(Int64)
        case text(String)

        var integer: Int64? { if case .integer(let v) = self { v } else { nil } }
        var text: String? { if case .text(let v) = self { v } else { nil } }
    }

    struct Error: Swift.Error, CustomStringConvertible {
        var path: String
        var context: String
        var message: String
        var code: Int32
        var description: String { "layer database \(path): \(context): \(message) (SQLite code \(code))" }
        /// The file is damaged, or not a database at all: SQLITE_CORRUPT or SQLITE_NOTADB, in
        /// the low byte that extended result codes keep.
        var isCorrupt: Bool { code & 0xff == SQLITE_CORRUPT || code & 0xff == SQLITE_NOTADB }
    }

    typealias Row = [Value]

    let path: String
    private var db: OpaquePointer?
    /// Connections are used from one thread at a time; the store serializes its operations.
    private let lock = Lock()
    static let busyTimeoutMilliseconds: Int32 = 10_000

    init(path: String) throws {
        self.path = path
        var handle: OpaquePointer?
        let rc = sqlite3_open_v2(path, &handle, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nil)
        guard rc == SQLITE_OK, let handle else {
            let message = handle.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close(handle)
            throw Error(path: path, context: "open", message: message, code: rc)
        }
        db = handle
        sqlite3_busy_timeout(handle, Self.busyTimeoutMilliseconds)
        try execute("PRAGMA journal_mode=WAL")
        try execute("PRAGMA synchronous=FULL")
        try execute("PRAGMA foreign_keys=ON")
    }

    deinit { close() }

    /// Closes the connection; later queries fail. Idempotent.
    func close() {
        lock.withLock {
            sqlite3_close(db)
            db = nil
        }
    }

    private func check(_ rc: Int32, _ context: @autoclosure () -> String) throws {
        guard rc == SQLITE_OK || rc == SQLITE_ROW || rc == SQLITE_DONE else {
            throw Error(path: path, context: context(), message: String(cString: sqlite3_errmsg(db)), code: rc)
        }
    }

    /// Runs `sql` (one statement) with `arguments` bound to its `?` parameters; returns every row.
    @discardableResult
    func query(_ sql: String, _ arguments: [Value] = []) throws -> [Row] {
        try lock.withLock {
            guard db != nil else { throw Error(path: path, context: sql, message: "the database is closed", code: SQLITE_MISUSE) }
            var statement: OpaquePointer?
            try check(sqlite3_prepare_v2(db, sql, -1, &statement, nil), "prepare \(sql)")
            defer { sqlite3_finalize(statement) }
            for (i, value) in arguments.enumerated() {
                let index = Int32(i + 1)
                switch value {
                case .null: try check(sqlite3_bind_null(statement, index), "bind \(index) of \(sql)")
                case .integer(let v): try check(sqlite3_bind_int64(statement, index, v), "bind \(index) of \(sql)")
                case .text(let v):
                    // SQLITE_TRANSIENT (-1): SQLite copies the bytes before bind returns.
                    let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
                    try check(sqlite3_bind_text(statement, index, v, -1, transient), "bind \(index) of \(sql)")
                }
            }
            var rows: [Row] = []
            while true {
                let rc = sqlite3_step(statement)
                if rc == SQLITE_DONE { break }
                try check(rc, sql)
                let columns = sqlite3_column_count(statement)
                rows.append((0..<columns).map { c in
                    switch sqlite3_column_type(statement, c) {
                    case SQLITE_INTEGER: .integer(sqlite3_column_int64(statement, c))
                    case SQLITE_NULL: .null
                    default: .text(String(cString: sqlite3_column_text(statement, c)))
                    }
                })
            }
            return rows
        }
    }

    func execute(_ sql: String, _ arguments: [Value] = []) throws { try query(sql, arguments) }

    /// Runs `body` in one write transaction (`BEGIN IMMEDIATE`: the write lock is taken up front,
    /// so two processes never both read and then both try to write). Rolls back if `body` throws.
    func transaction<T>(_ body: () throws -> T) throws -> T {
        try execute("BEGIN IMMEDIATE")
        do {
            let result = try body()
            try execute("COMMIT")
            return result
        } catch {
            try? execute("ROLLBACK")
            throw error
        }
    }

    /// Called after every commit of this connection, once it is durable (`sqlite3_wal_hook`):
    /// the power-cut replay copies the database's files at each such point. Setting it takes
    /// over SQLite's auto-checkpoint (a WAL hook replaces it), so the hook checkpoints as that
    /// does, at SQLite's default of 1000 frames, and nothing else about the database changes.
    var afterCommit: (@Sendable () -> Void)? {
        didSet {
            lock.withLock {
                guard let db else { return }
                guard afterCommit != nil else {
                    sqlite3_wal_autocheckpoint(db, Self.autocheckpointFrames)
                    return
                }
                sqlite3_wal_hook(db, { context, handle, name, frames in
                    if frames >= LayerDatabase.autocheckpointFrames {
                        sqlite3_wal_checkpoint_v2(handle, name, SQLITE_CHECKPOINT_PASSIVE, nil, nil)
                    }
                    Unmanaged<LayerDatabase>.fromOpaque(context!).takeUnretainedValue().afterCommit?()
                    return SQLITE_OK
                }, Unmanaged.passUnretained(self).toOpaque())
            }
        }
    }

    /// SQLITE_DEFAULT_WAL_AUTOCHECKPOINT.
    static let autocheckpointFrames: Int32 = 1000

    /// SQLite's version string, for `thinfs info`.
    static var libraryVersion: String { String(cString: sqlite3_libversion()) }
}
