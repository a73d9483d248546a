import Foundation
import PersistentData
import TestSupport
import Testing
@testable import ThinFS

/// The layer store without FUSE: options, snapshots, busy locks, deferred deletion, the
/// journal's crash recovery and reconciliation. thin_check and thin_dump are the oracles for
/// what the pool holds.
@Suite("Layer store", .enabled(if: Oracle.available, "thin-provisioning-tools are not installed"))
struct LayerStoreTests {
    static func options(_ extra: [String] = []) throws -> StorageOptions {
        try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=512M", "dm.loopmetadatasize=16M"] + extra)
    }

    /// The thin device ids thin_dump lists for the store's metadata file.
    static func dumpedDevices(_ store: LayerStore) throws -> Set<UInt32> {
        try store.close()
        let xml = try Oracle.dump(try store.poolRoot.config().metadata)
        return Set(xml.split(separator: "\n").compactMap { line -> UInt32? in
            guard line.contains("<device dev_id=\"") else { return nil }
            let rest = line.split(separator: "\"")
            return rest.count > 1 ? UInt32(rest[1]) : nil
        })
    }

    @Test func storageOptionsFollowDocker() throws {
        let o = try StorageOptions(parsing: ["dm.basesize=20G", "dm.use_deferred_deletion=true", "dm.min_free_space=5%", "dm.mkfsarg=-O ^has_journal"])
        #expect(o.baseSize == 20 << 30 && o.deferredDeletion && !o.deferredRemoval && o.minFreeSpacePercent == 5)
        #expect(o.mkfsArguments == ["-O ^has_journal"])
        #expect(o.loopDataSize == 100 << 30 && o.loopMetadataSize == 2 << 30 && o.blockSize == 64 << 10)
        // Each bad option names itself.
        let cases: [(String, String)] = [
            ("dm.nosuchthing=1", "dm.nosuchthing: unknown option"),   // unknown keys are an error, as in Docker
            ("dm.fs=xfs", "xfs may come later"),                       // xfs: not yet, and said so
            ("dm.basesize=banana", "dm.basesize: 'banana' is not a size"),
            ("dm.blocksize=100K", "multiple of 64K"),                   // dm-thin's rule
            ("dm.min_free_space=150%", "percentage"),
            ("dm.use_deferred_removal=maybe", "not a boolean"),
            ("novalue", "expected KEY=VALUE"),
        ]
        for (option, message) in cases {
            #expect(throws: StorageOptions.Error.self) { try StorageOptions(parsing: [option]) }
            do { _ = try StorageOptions(parsing: [option]) } catch { #expect("\(error)".contains(message), "\(option): \(error)") }
        }
    }

    /// rbd.catalogue (issue 16) reaches the RBD pool's configuration; it is refused with another
    /// backend and as a name Ceph could not take, naming the option.
    @Test func rbdCatalogueOption() throws {
        let o = try StorageOptions(parsing: ["thinfs.backend=rbd", "rbd.prefix=host-a-", "rbd.catalogue=layers"])
        #expect(o.rbdConfiguration.catalogue == "layers" && o.rbdConfiguration.prefix == "host-a-")
        #expect(try StorageOptions(parsing: ["thinfs.backend=rbd"]).rbdConfiguration.catalogue == nil)
        for (options, message) in [(["rbd.catalogue=layers"], "rbd.catalogue: applies to thinfs.backend=rbd only"),
                                   (["thinfs.backend=rbd", "rbd.catalogue=a/b"], "rbd.catalogue: 'a/b' must be a non-empty name")] {
            do {
                _ = try StorageOptions(parsing: options)
                Issue.record("\(options) accepted")
            } catch { #expect("\(error)".contains(message), "\(options): \(error)") }
        }
        // A store keeps it: another value at 'thinfs serve' is refused.
        #expect(throws: StorageOptions.Error.self) { try o.checkUnchanged(by: ["thinfs.backend=rbd", "rbd.catalogue=other"], root: "/r") }
    }

    /// rbd.osd_timeout and rbd.mon_timeout (issue 16: a cluster that stops under a mount) reach
    /// the RBD pool's configuration, with bounded defaults; 0 (Ceph's "for ever"), non-numbers and
    /// other backends are refused, naming the option. RBDOutageTests checks what they do.
    @Test func rbdTimeoutOptions() throws {
        let o = try StorageOptions(parsing: ["thinfs.backend=rbd", "rbd.osd_timeout=5", "rbd.mon_timeout=7"])
        #expect(o.rbdConfiguration.osdTimeout == 5 && o.rbdConfiguration.monTimeout == 7)
        let defaults = try StorageOptions(parsing: ["thinfs.backend=rbd"]).rbdConfiguration
        #expect(defaults.osdTimeout == 30 && defaults.monTimeout == 15)
        for (options, message) in [(["rbd.osd_timeout=5"], "rbd.osd_timeout: applies to thinfs.backend=rbd only"),
                                   (["thinfs.backend=rbd", "rbd.osd_timeout=0"], "rbd.osd_timeout: '0' must be a number of seconds from 1 to 3600"),
                                   (["thinfs.backend=rbd", "rbd.mon_timeout=soon"], "rbd.mon_timeout: 'soon' must be a number of seconds")] {
            do {
                _ = try StorageOptions(parsing: options)
                Issue.record("\(options) accepted")
            } catch { #expect("\(error)".contains(message), "\(options): \(error)") }
        }
        #expect(throws: StorageOptions.Error.self) { try o.checkUnchanged(by: ["thinfs.backend=rbd", "rbd.osd_timeout=9"], root: "/r") }
        try o.checkUnchanged(by: ["thinfs.backend=rbd", "rbd.osd_timeout=5"], root: "/r")
    }

    @Test func initCreatesTheBaseDeviceAndReopenVerifiesIt() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: Self.options(), logger: quietLogger)
        #expect(store.base.size == 64 << 20)
        let uuid = store.base.uuid
        try store.close()
        #expect(try Oracle.check(try store.poolRoot.config().metadata))
        try LayerStore.open(root: dir.path, logger: quietLogger).close()
        #expect(throws: LayerStore.Error.alreadyInitialized(root: dir.path)) {
            try LayerStore.initialize(root: dir.path, options: Self.options(), logger: quietLogger)
        }
        // A different filesystem on the base device means a different pool: refused, said so.
        do {
            let pool = try PoolRoot(path: dir.path).open()
            _ = try DeviceFormatter(logger: quietLogger).format(pool: pool, id: 1, size: 64 << 20, force: true, scratchDirectory: dir.path + "/tmp")
            try pool.close()
        }
        #expect {
            try LayerStore.open(root: dir.path, logger: quietLogger)
        } throws: { error in
            guard case LayerStore.Error.baseMismatch(_, let expected, _) = error else { return false }
            return expected == uuid
        }
        #expect(throws: LayerStore.Error.notInitialized(root: dir.path + "/nothing")) {
            try LayerStore.open(root: dir.path + "/nothing", logger: quietLogger)
        }
    }

    @Test func layersAreSnapshotsAndParentsAreProtected() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: Self.options(), logger: quietLogger)
        let a = try store.createImageLayer("a", parent: nil)
        let b = try store.createImageLayer("b", parent: "a")
        let c = try store.createContainerLayer("c", parent: "b", size: nil)
        #expect(Set([a.deviceID, b.deviceID, c.deviceID]).count == 3)
        #expect(!Set([a.deviceID, b.deviceID, c.deviceID]).contains(store.base.deviceID))

        // Write into the container: the image layer under it must not change.
        let before = try store.openLayer("b", readOnly: true, what: "test")
        let imageRoot = try before.volume.readdirNames(before.volume.rootInode)
        try before.close()
        let rw = try store.openLayer("c", readOnly: false, what: "test")
        _ = try rw.volume.mknod(parent: rw.volume.rootInode, name: "new-file", mode: 0o100644, rdev: 0, owner: .root)
        try rw.close()
        let after = try store.openLayer("b", readOnly: true, what: "test")
        #expect(try after.volume.readdirNames(after.volume.rootInode) == imageRoot)
        try after.close()
        let again = try store.openLayer("c", readOnly: true, what: "test")
        #expect(try again.volume.readdirNames(again.volume.rootInode).contains("new-file"))
        try again.close()

        // Image layers with a child are frozen; containers are not parents; children block rm.
        #expect(throws: LayerStore.Error.parentFrozen("b", child: "c")) { try store.openLayer("b", readOnly: false, what: "test") }
        #expect(throws: LayerStore.Error.notAnImageLayer("c", kind: .container)) { try store.createImageLayer("d", parent: "c") }
        #expect(throws: LayerStore.Error.hasChildren("a", children: ["b"])) { try store.remove("a") }
        #expect(throws: LayerStore.Error.layerExists("c", state: .active)) { try store.createImageLayer("c", parent: "a") }
        #expect(throws: LayerStore.Error.unknownLayer("zz")) { try store.createImageLayer("d", parent: "zz") }
        #expect(throws: LayerStore.Error.self) { try store.createImageLayer("../evil", parent: nil) }

        let usage = try store.listing()
        #expect(usage.map(\.id) == ["a", "b", "c"])
        #expect(usage[2].exclusiveBytes > 0 && usage[2].sharedBytes > 0)   // c wrote its own blocks and shares b's

        #expect(try store.remove("c") == .deleted)
        #expect(try store.remove("b") == .deleted)
        let devices = try Self.dumpedDevices(store)
        #expect(devices == [store.base.deviceID, a.deviceID])
        #expect(try Oracle.check(try store.poolRoot.config().metadata))
    }

    @Test func deferredDeletionWaitsForTheLastUser() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: Self.options(["dm.use_deferred_deletion=true"]), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        let c = try store.createContainerLayer("c", parent: "img", size: nil)
        let user = try store.openLayer("c", readOnly: false, what: "test user")
        guard case .deferred(let holder) = try store.remove("c") else { Issue.record("rm of a busy layer was not deferred"); return }
        #expect(holder.contains("pid \(getpid())") && holder.contains("test user"))
        #expect(try store.deferredDeletedCount() == 1)
        #expect(throws: LayerStore.Error.deleted("c")) { try store.liveLayer("c") }
        #expect(throws: LayerStore.Error.deleted("c")) { try store.createContainerLayer("c2", parent: "c", size: nil) }
        #expect(try store.cleanup().isEmpty)   // still busy
        #expect(try store.pool.deviceExists(c.deviceID))
        try user.close()
        #expect(try store.cleanup() == ["c"])
        #expect(try store.deferredDeletedCount() == 0)
        #expect(!(try Self.dumpedDevices(store)).contains(c.deviceID))
        #expect(try Oracle.check(try store.poolRoot.config().metadata))
    }

    @Test func busyLayerWithoutDeferredDeletionIsRefused() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: Self.options(), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        let user = try store.openLayer("img", readOnly: true, what: "mounted at /somewhere")
        #expect {
            try store.remove("img")
        } throws: { error in
            guard case LayerStore.Error.busy("img", let holder) = error else { return false }
            return holder.contains("mounted at /somewhere") && (error as! LayerStore.Error).errno == .resourceBusy
        }
        try user.close()
        #expect(try store.remove("img") == .deleted)
    }

    @Test func minFreeSpaceRefusesCreates() throws {
        let dir = TempDir()
        // A 32M pool that must keep half free, and a container that writes 20M into it.
        let options = try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=32M", "dm.loopmetadatasize=8M", "dm.min_free_space=50%"])
        let store = try LayerStore.initialize(root: dir.path, options: options, logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        let c = try store.createContainerLayer("c", parent: "img", size: nil)
        let open = try store.openLayer("c", readOnly: false, what: "test")
        let file = try open.volume.mknod(parent: open.volume.rootInode, name: "big", mode: 0o100644, rdev: 0, owner: .root)
        let chunk = [UInt8](repeating: 0x5a, count: 1 << 20)
        for i in 0..<20 {
            _ = try chunk.withUnsafeBytes { try open.volume.write(file.ino, at: UInt64(i) << 20, from: $0) }
        }
        try open.close()
        let status = try store.pool.status()
        #expect(status.totalDataBlocks - status.usedDataBlocks < status.totalDataBlocks / 2)
        #expect {
            try store.createContainerLayer("c2", parent: "img", size: nil)
        } throws: { error in
            let text = "\(error)"
            return text.contains("free data blocks") && text.contains("dm.min_free_space") && text.contains("grow the pool")
                && (error as? LayerStore.Error)?.errno == .noSpace
        }
        #expect(try store.allLayers().map(\.id) == ["img", "c"])
        #expect(Set(try store.pool.deviceIDs()) == [store.base.deviceID, c.deviceID, 2])
        // Removing the container frees the space, and creates work again.
        #expect(try store.remove("c") == .deleted)
        _ = try store.createContainerLayer("c2", parent: "img", size: nil)
    }

    @Test func reconcileRepairsDriftBetweenStoreAndPool() throws {
        let dir = TempDir()
        var store: LayerStore? = try LayerStore.initialize(root: dir.path, options: Self.options(), logger: quietLogger)
        let kept = try store!.createImageLayer("kept", parent: nil)
        let lost = try store!.createImageLayer("lost", parent: nil)
        try store!.close()
        store = nil
        // Drift behind the store's back: an orphan device ("device already there") and a lost one.
        do {
            let pool = try PoolRoot(path: dir.path).open()
            try pool.message(.createThin(50))
            try pool.message(.delete(lost.deviceID))
            try pool.close()
        }
        let reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        #expect(reopened.lastRecovery.orphanDevices == [50])
        #expect(reopened.lastRecovery.missingDevices == ["lost"])
        #expect(try reopened.allLayers().map(\.id) == ["kept"])
        // The store works on with the repaired pool.
        let next = try reopened.createImageLayer("next", parent: nil)
        #expect(try Self.dumpedDevices(reopened) == [reopened.base.deviceID, kept.deviceID, next.deviceID])
        #expect(try Oracle.check(try reopened.poolRoot.config().metadata))
    }
}

@Suite("Layer store crash recovery", .enabled(if: Oracle.available && CLI.available, "needs thin_check and the thinfs binary"))
struct LayerStoreCrashTests {
    /// Kills `thinfs layer create` / `rm` with SIGKILL at each journaled step, then checks that
    /// reopening rolls back or forward, and that the store and the pool agree, by thin_dump.
    /// A create is one pool commit and then one database transaction (the table on
    /// `LayerStore+Journal.swift`); its `create.sent` is between two pool commits, which only
    /// the kernel's dm-thin makes (`scripts/vm/tests/layers-thinpooldev`).
    @Test(arguments: [
        ("create.opened", false),     // journaled, nothing sent: rolled back
        ("create.closed", false),     // the pool committed the device and the transaction id, the
                                      // store has no row: the device is deleted
        ("create.recorded", true),    // the row and the journal entry's removal committed: done
    ])
    func createCrashes(point: String, survives: Bool) throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        try store.close()
        let result = try CLI.run(["layer", "create-rw", "--root", dir.path, "victim", "--parent", "img"], environment: ["THINFS_CRASH_AT": point])
        #expect(result.status != 0, "the crash hook did not fire at \(point)")
        let reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        #expect((try reopened.layer("victim") != nil) == survives, "\(point)")
        // The store works on: the id is free again (or taken, if it survived).
        if survives {
            #expect(throws: LayerStore.Error.layerExists("victim", state: .active)) { try reopened.createContainerLayer("victim", parent: "img", size: nil) }
        } else {
            _ = try reopened.createContainerLayer("victim", parent: "img", size: nil)
        }
        let recorded = Set(try reopened.allLayers().map(\.deviceID) + [reopened.base.deviceID])
        #expect(recorded.count == 3)
        #expect(try LayerStoreTests.dumpedDevices(reopened) == recorded, "\(point): the pool and the store disagree")
        #expect(try Oracle.check(try reopened.poolRoot.config().metadata))
    }

    /// Reopens the store at `root` with its pool's file I/O recorded and its database's commits
    /// counted, and runs `change` on it: the pool's file operations and the database commits
    /// `change` made, and the open store.
    static func recordingCommits(root: String, _ change: (LayerStore) throws -> Void) throws
        -> (ops: [String], databaseCommits: Int, store: LayerStore) {
        let recorder = CommitFlushTests.Recorder()
        let dataPath = try PoolRoot(path: root).config().data
        PoolIOHooks.install(recorder, dataPath: dataPath)
        defer { PoolIOHooks.remove(dataPath: dataPath) }
        let store = try LayerStore.open(root: root, logger: quietLogger)
        final class Count: @unchecked Sendable {
            let lock = Lock()
            var value = 0
        }
        let commits = Count()
        store.db.afterCommit = { commits.lock.withLock { commits.value += 1 } }
        _ = recorder.take()
        try change(store)
        return (recorder.take(), commits.lock.withLock { commits.value }, store)
    }

    /// A container's create commits the pool once (the device and the transaction id together)
    /// and the database twice (the journal entry; the row with the entry's removal). It was two
    /// pool commits and three database commits, each with its host flushes.
    @Test func aCreateCommitsThePoolOnceAndTheDatabaseTwice() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        try store.close()
        let (ops, commits, reopened) = try Self.recordingCommits(root: dir.path) {
            _ = try $0.createContainerLayer("c", parent: "img", size: nil)
        }
        #expect(ops.filter { $0 == "durable write metadata superblock" }.count == 1, "\(ops)")
        // No data was written since the last commit: the metadata file's flush alone, then the superblock.
        #expect(ops.filter { $0.hasPrefix("sync") } == ["sync metadata"], "\(ops)")
        #expect(commits == 2)
        // The store and the pool agree on what was made (thin_dump, after closing the store).
        let recorded = Set(try reopened.allLayers().map(\.deviceID) + [reopened.base.deviceID])
        #expect(recorded.count == 3)
        #expect(try LayerStoreTests.dumpedDevices(reopened) == recorded)
    }

    /// A delete, like a create, is one pool commit (`delete` and `set_transaction_id` together)
    /// and two database commits (the journal row; then the layer's row and the journal row's
    /// removal in one transaction). It was two and three, as the create's were.
    @Test func aDeleteCommitsThePoolOnceAndTheDatabaseTwice() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        let victim = try store.createContainerLayer("c", parent: "img", size: nil)
        try store.close()
        let (ops, commits, reopened) = try Self.recordingCommits(root: dir.path) {
            let removal = try $0.remove("c")
            #expect(removal == .deleted)
        }
        #expect(ops.filter { $0 == "durable write metadata superblock" }.count == 1, "\(ops)")
        #expect(ops.filter { $0.hasPrefix("sync") } == ["sync metadata"], "\(ops)")
        #expect(commits == 2)
        #expect(try reopened.layer("c") == nil)
        #expect(try reopened.db.query("SELECT COUNT(*) FROM journal").first?.first?.integer == 0)
        let recorded = Set(try reopened.allLayers().map(\.deviceID) + [reopened.base.deviceID])
        #expect(!recorded.contains(victim.deviceID))
        #expect(try LayerStoreTests.dumpedDevices(reopened) == recorded)
    }

    /// The two journal states the userspace pool's crash points cannot make, written by hand:
    /// a device committed without its transaction id (the kernel's dm-thin commits each
    /// message: `create.sent`), and a row recorded before the pool's commit (the five-step
    /// protocol of earlier versions, crashed after its step 4). The first is rolled back and
    /// its device deleted; the second rolled forward.
    @Test func recoveryOfKernelAndEarlierJournals() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        let img = try store.createImageLayer("img", parent: nil)
        let tx = try store.transactionID
        // Between the kernel's two commits: the device, not the transaction id.
        try store.db.execute("INSERT INTO journal(txid, op, layer, device_id, origin) VALUES(?, 'create', 'sent', 900, ?)",
                             [.integer(Int64(tx + 1)), .integer(Int64(img.deviceID))])
        try store.pool.message(.createSnap(900, origin: img.deviceID))
        try store.close()
        var reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        #expect(reopened.lastRecovery.rolledBack == ["sent"])
        #expect(reopened.lastRecovery.orphanDevices == [])
        #expect(try reopened.layer("sent") == nil)
        #expect(try LayerStoreTests.dumpedDevices(reopened) == [reopened.base.deviceID, img.deviceID])   // closes it
        reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        #expect(reopened.lastRecovery.isEmpty)
        // The five-step protocol after its close: row, device and transaction id, the journal entry left.
        let tx2 = try reopened.transactionID
        try reopened.db.execute("INSERT INTO journal(txid, op, layer, device_id, origin) VALUES(?, 'create', 'old', 901, ?)",
                                [.integer(Int64(tx2 + 1)), .integer(Int64(img.deviceID))])
        try reopened.pool.message(.createSnap(901, origin: img.deviceID))
        try reopened.insert(LayerStore.Layer(id: "old", parent: "img", deviceID: 901, kind: .container, size: img.size,
                                             state: .active, uuid: img.uuid, created: Date()))
        try reopened.pool.message(.setTransactionID(current: tx2, new: tx2 + 1))
        try reopened.close()
        reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        #expect(reopened.lastRecovery.rolledForward == ["old"])
        #expect(try reopened.layer("old")?.deviceID == 901)
        #expect(try reopened.db.query("SELECT COUNT(*) FROM journal").first?.first?.integer == 0)
        #expect(try LayerStoreTests.dumpedDevices(reopened) == [reopened.base.deviceID, img.deviceID, 901])   // closes it
        #expect(try Oracle.check(try reopened.poolRoot.config().metadata))
    }

    /// `delete.sent` falls between the kernel's two commits only (the VM suite's
    /// layers-thinpooldev crashes there); the userspace pool makes both messages one commit.
    @Test(arguments: ["delete.opened", "delete.closed", "delete.recorded"])
    func deleteCrashes(point: String) throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        let victim = try store.createContainerLayer("victim", parent: "img", size: nil)
        try store.close()
        let result = try CLI.run(["layer", "rm", "--root", dir.path, "victim"], environment: ["THINFS_CRASH_AT": point])
        #expect(result.status != 0, "the crash hook did not fire at \(point)")
        let reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        // A delete the user asked for is finished, wherever it stopped.
        #expect(try reopened.layer("victim") == nil, "\(point)")
        let recorded = Set(try reopened.allLayers().map(\.deviceID) + [reopened.base.deviceID])
        let devices = try LayerStoreTests.dumpedDevices(reopened)
        #expect(!devices.contains(victim.deviceID), "\(point)")
        #expect(devices == recorded)
        #expect(try Oracle.check(try reopened.poolRoot.config().metadata))
    }
}

extension LayerStoreCrashTests {
    /// Kills `thinfs layer apply-diff` into a container with a file at each step of writing through
    /// a scratch snapshot: reopening leaves the container with exactly its old content (before the
    /// switch) or exactly the new (after it), and the pool with no device more (thin_dump, thin_check).
    @Test(.enabled(if: PyTar.available, "needs python3"), arguments: [
        ("scratch.opened", false),    // journaled, nothing sent: the old content
        ("scratch.sent", false),      // the snapshot in the pool's memory only: gone with the process
        ("scratch.closed", false),    // the snapshot committed, nothing written: deleted
        ("scratch.written", false),   // the new content committed in the snapshot, not switched: deleted
        ("scratch.switched", true),   // the row names the snapshot: the old device is deleted
        ("scratch.deleted", true),    // the old device deleted, the journal entry left: forgotten
    ])
    func applyDiffCrashes(point: String, applied: Bool) throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path + "/store", options: LayerStoreTests.options(), logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        _ = try store.createContainerLayer("victim", parent: "img", size: nil)
        let old = dir.path + "/old.tar", new = dir.path + "/new.tar"
        try PyTar.make(old, #"reg("file", b"old")"#)
        try PyTar.make(new, """
        reg("file", b"new")
        reg("added", b"x")
        """)
        _ = try store.applyDiff("victim", from: old)
        try store.close()
        let result = try CLI.run(["layer", "apply-diff", "--root", dir.path + "/store", "victim", new],
                                 environment: ["THINFS_CRASH_AT": point])
        #expect(result.status != 0, "the crash hook did not fire at \(point)")
        let reopened = try LayerStore.open(root: dir.path + "/store", logger: quietLogger)
        let victim = try #require(try reopened.layer("victim"), "\(point): the layer is gone")
        #expect(victim.state == .active)
        let open = try reopened.openLayer("victim", readOnly: true, what: "test")
        let v = open.volume
        #expect(try v.readdirNames(v.rootInode).filter { $0 != "lost+found" } == (applied ? ["added", "file"] : ["file"]), "\(point)")
        let file = try v.lookup(parent: v.rootInode, name: "file")
        var bytes = [UInt8](repeating: 0, count: 16)
        let n = try bytes.withUnsafeMutableBytes { try v.read(file.ino, at: 0, into: $0) }
        #expect(String(decoding: bytes[0..<n], as: UTF8.self) == (applied ? "new" : "old"), "\(point)")
        try open.close()
        let recorded = Set(try reopened.allLayers().map(\.deviceID) + [reopened.base.deviceID])
        #expect(recorded.count == 3)
        #expect(try LayerStoreTests.dumpedDevices(reopened) == recorded, "\(point): the pool and the store disagree")
        #expect(try Oracle.check(try reopened.poolRoot.config().metadata))
    }
}

extension Volume {
    /// The names in directory `ino`, without . and .., sorted.
    func readdirNames(_ ino: UInt64) throws -> [String] {
        var names: [String] = []
        try readdir(ino, after: 0) { entry in
            if entry.name != "." && entry.name != ".." { names.append(entry.name) }
            return true
        }
        return names.sorted()
    }
}
