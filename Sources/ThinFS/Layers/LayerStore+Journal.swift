import Foundation
import PersistentData

/// Pool changes as journaled transactions: moby's open-transaction protocol
/// (deviceset.go `openTransaction` / `closeTransaction` / `rollbackTransaction`), kept in the
/// store's database instead of a `transaction-metadata` file. Earlier versions (and moby) take
/// five steps, with two pool commits and three database commits; recovery still reads the
/// journals they leave:
///
///     step                         database                      pool (durable at commit)
///     ───────────────────────────  ────────────────────────────  ─────────────────────────────
///     1 open                       journal += (T, op, layer, dev)
///     2 send                                                     create_snap dev origin / delete dev
///     3 record                     layers += row / -= row
///     4 close                                                    set_transaction_id T-1 T; commit
///     5 forget                     journal -= T
///
/// Creates and deletes now take a shorter path, with one pool commit and two database commits:
///
///     1 open                       journal += (T, create, ...)
///     2 send and close                                           create_snap dev origin;
///                                                                set_transaction_id T-1 T; commit
///     3 record and forget          layers += row, journal -= T
///                                  (one transaction)
///
///     1 open                       journal += (T, delete, ...)
///     2 send and close                                           delete dev;
///                                                                set_transaction_id T-1 T; commit
///     3 record and forget          layers -= row, journal -= T
///                                  (one transaction)
///
/// The userspace pool takes step 2's two messages in one commit. The kernel's dm-thin (and RBD)
/// commit each message, so there a crash can fall between them (`create.sent`, `delete.sent`):
/// the change is durable and the transaction id is not. Recovery rolls such a create back like
/// any create short of step 3, and finishes such a delete like any other. A create's row is
/// written after the device exists, never before: readers outside the store's lock never see a
/// layer whose device the pool lacks; a delete's row goes after its device.
///
/// The pool's transaction id says whether step 4 (step 2 of the shorter path) happened. At
/// open, for each journal row:
/// - a delete with pool transaction id ≥ T: the pool has the change; roll forward (make the
///   database say so).
/// - a create with pool transaction id ≥ T: the device is committed. If the row is there (a
///   journal of the five-step protocol, which recorded before it closed) roll forward; if not,
///   the create stopped before step 3 and never returned: the device is deleted.
/// - otherwise: roll back a create (delete the device if an earlier commit made it durable, drop
///   the row), and finish a delete (the user asked for it, and the data may be half gone).
///
/// Then every layer still `applying` is deleted, journaled like any delete: its writer (a new
/// layer's: image import) was killed before the content was committed and the layer marked active,
/// so what the device holds is partial. Only the pool's one writer opens the store, so no live
/// writer can own such a layer at that point.
///
/// Crash points for tests (`THINFS_CRASH_AT`), for creates and deletes alike: `create.opened` /
/// `delete.opened` after step 1, `create.sent` / `delete.sent` between the two messages (kernel
/// and RBD pools only), `create.closed` / `delete.closed` after step 2, `create.recorded` /
/// `delete.recorded` after step 3.
///
/// **Scratch devices.** New content for an existing layer (`writeContent`) is written into a
/// thin snapshot of the layer's device, never into the device itself, so the layer's committed
/// content is untouched until one database update makes the snapshot the layer's device:
///
///     step                           journal (T, scratch, L, S, D)   layers.device_id   crash: next open
///     ─────────────────────────────  ──────────────────────────────  ─────────────────  ──────────────────
///     1 open                         added                           D                  S deleted if there
///     2 create_snap S D, commit T                                    D                  S deleted
///     3 content written into S,                                      D                  S deleted
///       volume closed, pool commit
///     4 switch                                                       S                  D deleted
///     5 delete D, commit                                             S                  (D gone)
///     6 forget                       removed
///
/// The layer row alone says which device holds the layer's content, so recovery needs no
/// transaction id: the device the row does not name is the one deleted. Writing into D with S
/// as a backup would need a second switch to roll back, and a crash in the middle of the write
/// would leave the row naming a half-written device. A writer that fails deletes S at once
/// (steps 1-3 undone while the process lives); if that fails too, the next open does it.
/// Crash points: `scratch.opened`, `scratch.sent`, `scratch.closed` (after step 2),
/// `scratch.written` (after 3), `scratch.switched` (after 4), `scratch.deleted` (after 5).
extension LayerStore {
    enum JournalOp: String { case create, delete, scratch }

    struct JournalEntry {
        var txid: UInt64
        var op: JournalOp
        var layer: String
        var deviceID: ThinDeviceID
        var origin: ThinDeviceID?
    }

    /// What `open` found and repaired; also logged.
    public struct RecoveryReport: Sendable, Equatable {
        public var rolledBack: [String] = []
        public var rolledForward: [String] = []
        /// Thin devices the pool had and no layer owned: deleted.
        public var orphanDevices: [ThinDeviceID] = []
        /// Layers whose device the pool did not have: dropped from the database.
        public var missingDevices: [String] = []
        public var isEmpty: Bool { rolledBack.isEmpty && rolledForward.isEmpty && orphanDevices.isEmpty && missingDevices.isEmpty }
    }

    var transactionID: UInt64 { get throws { try pool.status().transactionID } }

    // MARK: The protocol

    /// Creates thin device `deviceID` as a snapshot of `origin` and records `layer`, journaled.
    /// A device id the pool already has is skipped, as moby does, and the next free one tried.
    /// `holdingStill`: the volume open read-write on `origin`, flushed and held still while the
    /// snapshot is taken, so that the snapshot is a whole ext4 (`commitSnapshot` of a layer in use).
    func journaledCreate(_ layer: Layer, origin: ThinDeviceID, holdingStill volume: Volume? = nil) throws -> Layer {
        var layer = layer
        var attempts = 0
        while true {
            let txid = try transactionID + 1
            try db.execute("INSERT INTO journal(txid, op, layer, device_id, origin) VALUES(?, 'create', ?, ?, ?)",
                           [.integer(Int64(txid)), .text(layer.id), .integer(Int64(layer.deviceID)), .integer(Int64(origin))])
            Self.crashPoint("create.opened")
            do {
                if let volume {
                    try volume.withFlushedState { try sendAndClose(.createSnap(layer.deviceID, origin: origin), txid: txid) }
                } else {
                    try sendAndClose(.createSnap(layer.deviceID, origin: origin), txid: txid)
                }
            } catch ThinPoolError.message(.deviceIDInUse(let taken)) {
                // "device already there": a device no layer records (containerd#4790). Skip its id.
                try db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(txid))])
                logger.warning("thin device id taken in the pool; trying the next", metadata: ["thin.id": "\(taken)"])
                attempts += 1
                guard attempts < 1000 else { throw Error.noFreeDeviceID }
                layer.deviceID = try allocateDeviceID(after: taken)
                continue
            }
            commitOpenVolumes(after: txid)
            Self.crashPoint("create.closed")
            do {
                try db.transaction {
                    try insert(layer)
                    try Self.setSetting(db, "next.device", String(layer.deviceID + 1))
                    try db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(txid))])
                }
            } catch {
                // The device is committed and no row names it: delete it now rather than at the
                // next open (which would, from the journal row, if this fails too).
                do {
                    try pool.message(.delete(layer.deviceID))
                    try db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(txid))])
                } catch let cleanup {
                    logger.error("a layer's record failed after its thin device was made; the next open deletes the device",
                                 metadata: ["layer": "\(layer.id)", "thin.id": "\(layer.deviceID)", "error": "\(cleanup)"])
                }
                throw error
            }
            Self.crashPoint("create.recorded")
            return layer
        }
    }

    /// Deletes `layer`'s thin device and its record, journaled: one pool commit where the pool
    /// can (see the table at the top).
    func journaledDelete(_ layer: Layer) throws {
        // A shared layer another host uses is refused before anything is journaled.
        try (pool as? RBDPool)?.checkDeletable(layer.deviceID)
        let txid = try transactionID + 1
        try db.execute("INSERT INTO journal(txid, op, layer, device_id, origin) VALUES(?, 'delete', ?, ?, NULL)",
                       [.integer(Int64(txid)), .text(layer.id), .integer(Int64(layer.deviceID))])
        Self.crashPoint("delete.opened")
        if try pool.deviceExists(layer.deviceID) {
            try sendAndClose(.delete(layer.deviceID), txid: txid, between: "delete.sent")
        } else {
            try pool.message(.setTransactionID(current: txid - 1, new: txid))
        }
        commitOpenVolumes(after: txid)
        Self.crashPoint("delete.closed")
        try db.transaction {
            try db.execute("DELETE FROM layers WHERE id = ?", [.text(layer.id)])
            try db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(txid))])
        }
        try? FileManager.default.removeItem(atPath: lockPath(layer.id))
        Self.crashPoint("delete.recorded")
    }

    // MARK: Scratch devices (see the table above)

    /// Steps 1-2: a thin snapshot of `layer`'s device, for new content, journaled. Returns its id.
    func journaledScratch(of layer: Layer) throws -> ThinDeviceID {
        var scratch = try allocateDeviceID()
        var attempts = 0
        while true {
            let txid = try transactionID + 1
            try db.execute("INSERT INTO journal(txid, op, layer, device_id, origin) VALUES(?, 'scratch', ?, ?, ?)",
                           [.integer(Int64(txid)), .text(layer.id), .integer(Int64(scratch)), .integer(Int64(layer.deviceID))])
            Self.crashPoint("scratch.opened")
            do {
                try pool.message(.createSnap(scratch, origin: layer.deviceID))
            } catch ThinPoolError.message(.deviceIDInUse(let taken)) {
                try db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(txid))])
                logger.warning("thin device id taken in the pool; trying the next", metadata: ["thin.id": "\(taken)"])
                attempts += 1
                guard attempts < 1000 else { throw Error.noFreeDeviceID }
                scratch = try allocateDeviceID(after: taken)
                continue
            } catch {
                try? db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(txid))])
                throw error
            }
            Self.crashPoint("scratch.sent")
            try Self.setSetting(db, "next.device", String(scratch + 1))
            try closeTransaction(txid)
            Self.crashPoint("scratch.closed")
            return scratch
        }
    }

    /// Steps 4-6, once the scratch device's content is committed: the layer's row names it, and
    /// the old device goes. Throws only if the switch itself failed (the layer keeps its old
    /// content then, and the caller discards the scratch device); a failure to delete the old
    /// device afterwards is left to the next open, since the new content is already the layer's.
    func journaledSwitch(_ layer: Layer, to scratch: ThinDeviceID) throws {
        try locked {
            Self.crashPoint("scratch.written")
            try db.execute("UPDATE layers SET device_id = ? WHERE id = ? AND device_id = ?",
                           [.integer(Int64(scratch)), .text(layer.id), .integer(Int64(layer.deviceID))])
            Self.crashPoint("scratch.switched")
            do {
                if try pool.deviceExists(layer.deviceID) { try pool.message(.delete(layer.deviceID)) }
                try volumes.commit()
                Self.crashPoint("scratch.deleted")
                try db.execute("DELETE FROM journal WHERE op = 'scratch' AND device_id = ?", [.integer(Int64(scratch))])
            } catch {
                logger.error("layer content written, but its old thin device could not be deleted; the next open deletes it",
                             metadata: ["layer": "\(layer.id)", "thin.id": "\(layer.deviceID)", "error": "\(error)"])
            }
        }
    }

    /// Undoes steps 1-3 of a writer that failed: the scratch device goes, the layer keeps its old
    /// device. If that fails, the journal entry stays and the next open deletes the device.
    func discardScratch(_ scratch: ThinDeviceID, of id: String, after failure: Swift.Error) {
        locked {
            do {
                if try pool.deviceExists(scratch) { try pool.message(.delete(scratch)) }
                try volumes.commit()
                try db.execute("DELETE FROM journal WHERE op = 'scratch' AND device_id = ?", [.integer(Int64(scratch))])
                logger.warning("layer content could not be written; the layer keeps its previous content",
                               metadata: ["layer": "\(id)", "error": "\(failure)"])
            } catch {
                logger.error("layer content could not be written and its scratch device not deleted; the next open deletes it",
                             metadata: ["layer": "\(id)", "thin.id": "\(scratch)", "error": "\(failure)", "delete.error": "\(error)"])
            }
        }
    }

    /// Step 4: the pool's transaction id moves to `txid` in the same commit as the change.
    /// Then open volumes are flushed and committed (the group commit), so that the pool's last
    /// commit holds their filesystems whole again.
    ///
    /// Once the message has returned, the change is durable and done: the store reports it
    /// done. A failure of the group commit after it (a mounted container whose flush a full pool
    /// refuses) is that volume's to report, at its next fsync; reporting it here made
    /// `layer create` and `layer rm` exit 1 having created or removed the layer.
    private func closeTransaction(_ txid: UInt64) throws {
        try pool.message(.setTransactionID(current: txid - 1, new: txid))
        commitOpenVolumes(after: txid)
    }

    /// A create's step 2 (see the table at the top): `message`, then the transaction id, in one
    /// pool commit where the pool can (the userspace pool), else one commit each. The caller
    /// commits the open volumes after it (`commitOpenVolumes`), outside any volume it holds still.
    private func sendAndClose(_ message: PoolMessage, txid: UInt64, between crashPoint: String = "create.sent") throws {
        let close = PoolMessage.setTransactionID(current: txid - 1, new: txid)
        if let userspace = pool as? UserspaceThinPool {
            try userspace.messages([message, close])
        } else {
            try pool.message(message)
            Self.crashPoint(crashPoint)
            try pool.message(close)
        }
    }

    private func commitOpenVolumes(after txid: UInt64) {
        do {
            try volumes.commit()
        } catch {
            logger.warning("the pool change is committed; flushing the open volumes after it failed",
                           metadata: ["txid": "\(txid)", "error": "\(error)"])
        }
    }

    func insert(_ layer: Layer) throws {
        try db.execute("INSERT INTO layers(\(Self.columns)) VALUES(?, ?, ?, ?, ?, ?, ?, ?)", [
            .text(layer.id), layer.parent.map { .text($0) } ?? .null, .integer(Int64(layer.deviceID)),
            .text(layer.kind.rawValue), .integer(Int64(layer.size)), .text(layer.state.rawValue), .text(layer.uuid),
            .integer(Self.storedTime(layer.created)),
        ])
    }

    /// The next device id no layer, journal entry or pool device uses (24-bit, as dm-thin).
    func allocateDeviceID(after taken: ThinDeviceID? = nil) throws -> ThinDeviceID {
        let recorded = Set(try db.query("SELECT device_id FROM layers UNION SELECT device_id FROM journal").compactMap {
            $0.first?.integer.map { ThinDeviceID($0) }
        })
        let inPool = Set(try pool.deviceIDs())
        var candidate = max(try Self.setting(db, "next.device").flatMap(UInt32.init) ?? 1, (taken ?? 0) + 1)
        var wrapped = false
        while recorded.contains(candidate) || inPool.contains(candidate) || candidate == base.deviceID {
            candidate += 1
            if candidate > ThinMetadata.maxDeviceID {
                guard !wrapped else { throw Error.noFreeDeviceID }
                wrapped = true
                candidate = 1
            }
        }
        return candidate
    }

    // MARK: Recovery

    private func journal() throws -> [JournalEntry] {
        try db.query("SELECT txid, op, layer, device_id, origin FROM journal ORDER BY txid").map {
            JournalEntry(txid: UInt64($0[0].integer ?? 0), op: JournalOp(rawValue: $0[1].text ?? "") ?? .create,
                         layer: $0[2].text ?? "", deviceID: ThinDeviceID($0[3].integer ?? 0),
                         origin: $0[4].integer.map { ThinDeviceID($0) })
        }
    }

    /// Rolls interrupted changes back or forward, then reconciles the database with the pool.
    @discardableResult
    func recover() throws -> RecoveryReport {
        try locked {
            var report = RecoveryReport()
            for entry in try journal() {
                let poolTx = try transactionID
                switch (entry.op, poolTx >= entry.txid) {
                case (.create, true):
                    // The commit that made the device also moved the transaction id. A row written
                    // before it (the five-step protocol) leaves only the journal row; with no row,
                    // the create stopped before its record and never returned: the device goes.
                    if try layer(entry.layer)?.deviceID == entry.deviceID {
                        report.rolledForward.append(entry.layer)
                    } else {
                        if try pool.deviceExists(entry.deviceID), try deleteUnlessShared(entry.deviceID) {
                            try pool.commit()
                        }
                        report.rolledBack.append(entry.layer)
                    }
                case (.create, false):
                    if try pool.deviceExists(entry.deviceID) { try pool.message(.delete(entry.deviceID)) }
                    try db.execute("DELETE FROM layers WHERE id = ? AND device_id = ?",
                                   [.text(entry.layer), .integer(Int64(entry.deviceID))])
                    try pool.message(.setTransactionID(current: poolTx, new: entry.txid))
                    try pool.commit()
                    report.rolledBack.append(entry.layer)
                case (.scratch, _):
                    // Whichever device the layer's row does not name is the one to go (see the table).
                    let switched = try layer(entry.layer)?.deviceID == entry.deviceID
                    let loser = switched ? entry.origin : entry.deviceID
                    if let loser, try pool.deviceExists(loser), try deleteUnlessShared(loser) {
                        try pool.commit()
                    }
                    if switched { report.rolledForward.append(entry.layer) } else { report.rolledBack.append(entry.layer) }
                case (.delete, let done):
                    if !done {
                        if try pool.deviceExists(entry.deviceID) { try pool.message(.delete(entry.deviceID)) }
                        try pool.message(.setTransactionID(current: poolTx, new: entry.txid))
                        try pool.commit()
                    }
                    try db.execute("DELETE FROM layers WHERE id = ? AND device_id = ?",
                                   [.text(entry.layer), .integer(Int64(entry.deviceID))])
                    report.rolledForward.append(entry.layer)
                }
                try db.execute("DELETE FROM journal WHERE txid = ?", [.integer(Int64(entry.txid))])
            }
            for layer in try allLayers().reversed() where layer.state == .applying {
                // A layer being written has no children (it cannot be a parent until it is active),
                // but a child recorded anyway keeps its own data, as in `reconcile`.
                try db.execute("UPDATE layers SET parent = NULL WHERE parent = ?", [.text(layer.id)])
                try journaledDelete(layer)
                report.rolledBack.append(layer.id)
            }
            try reconcile(&report)
            if !report.isEmpty {
                logger.warning("recovered the layer store", metadata: [
                    "rolled_back": "\(report.rolledBack)", "rolled_forward": "\(report.rolledForward)",
                    "orphan_devices": "\(report.orphanDevices)", "missing_devices": "\(report.missingDevices)",
                ])
            }
            lastRecovery = report
            return report
        }
    }

    /// Devices the pool has and no layer records are deleted; layers whose device the pool
    /// lacks are dropped (their data is gone), children first.
    private func reconcile(_ report: inout RecoveryReport) throws {
        let layers = try allLayers()
        let owned = Set(layers.map(\.deviceID) + [base.deviceID])
        let inPool = try pool.deviceIDs()
        var changed = false
        for id in inPool where !owned.contains(id) {
            guard try deleteUnlessShared(id) else { continue }
            report.orphanDevices.append(id)
            changed = true
        }
        let present = Set(inPool)
        var missing = Set(layers.filter { !present.contains($0.deviceID) }.map(\.id))
        // A child of a missing layer keeps its own data (snapshots share blocks, they do not need
        // the origin), so only the missing ones go; their children are re-parented to nothing.
        for layer in layers.reversed() where missing.contains(layer.id) {
            try db.execute("UPDATE layers SET parent = NULL WHERE parent = ?", [.text(layer.id)])
            try db.execute("DELETE FROM layers WHERE id = ?", [.text(layer.id)])
            report.missingDevices.append(layer.id)
            missing.remove(layer.id)
        }
        if changed {
            let tx = try transactionID
            try pool.message(.setTransactionID(current: tx, new: tx + 1))
            try pool.commit()
        }
    }
}
