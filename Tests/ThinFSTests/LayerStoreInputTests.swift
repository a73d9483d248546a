import Foundation
import TestSupport
import Testing
@testable import ThinFS

/// Bad input at the store's own doors, whichever front door (CLI, control socket, a future gRPC
/// or HTTP service) it came through: every id, name and path is checked by the store itself,
/// and a damaged database is called what it is.
@Suite("Layer store input", .enabled(if: Oracle.available, "thin-provisioning-tools are not installed"))
struct LayerStoreInputTests {
    /// SQLite binds text up to its first NUL, and open(2) stops there too: `x..y\0junk` was
    /// `x..y` to every query and lock file. Each public entry point refuses it, naming it.
    @Test func aNulInAnIDIsRefusedAtEveryEntryPoint() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        let victim = try store.createImageLayer("x..y", parent: nil)
        let bad = "x..y\0junk"
        let out = dir.path + "/out.tar"
        // Each case: the entry point, called with the bad id.
        let calls: [(String, () throws -> Void)] = [
            ("remove", { _ = try store.remove(bad) }),
            ("layer", { _ = try store.layer(bad) }),
            ("liveLayer", { _ = try store.liveLayer(bad) }),
            ("children", { _ = try store.children(of: bad) }),
            ("openLayer", { try store.openLayer(bad, readOnly: true, what: "test").close() }),
            ("applyDiff", { _ = try store.applyDiff(bad, from: "/dev/null") }),
            ("diff", { try store.diff(bad, to: out) }),
            ("busyHolder", { _ = try store.busyHolder(bad) }),
            ("holdBusy", { try store.holdBusy(bad, what: "test", readOnly: true).release() }),
            ("createImageLayer", { _ = try store.createImageLayer(bad, parent: nil) }),
            ("createImageLayer parent", { _ = try store.createImageLayer("z", parent: bad) }),
            ("createContainerLayer parent", { _ = try store.createContainerLayer("z", parent: bad, size: nil) }),
        ]
        for (name, call) in calls {
            #expect(throws: LayerStore.Error.invalidLayerID(bad, reason: "it contains a NUL byte"), "\(name)") { try call() }
        }
        let message = "\(LayerStore.Error.invalidLayerID(bad, reason: "it contains a NUL byte"))"
        #expect(message.contains(#""x..y\0junk""#), "\(message)")
        // (Not == victim: `created` is stored in nanoseconds, and a Date may not survive that exactly.)
        let kept = try #require(try store.layer("x..y"))
        #expect(kept.deviceID == victim.deviceID && kept.state == .active)
        #expect(try store.allLayers().map(\.id) == ["x..y"])
        #expect(!FileManager.default.fileExists(atPath: out))
        // No lock file was made for the truncated name by the refused calls.
        let locks = (try? FileManager.default.contentsOfDirectory(atPath: store.locksDirectory)) ?? []
        #expect(!locks.contains { $0.hasPrefix("x..y") }, "\(locks)")
    }

    /// Paths and names meet open(2), mount(2) and SQLite too: a NUL is refused, naming them.
    @Test func aNulInAPathOrNameIsRefused() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        _ = try store.createImageLayer("x..y", parent: nil)
        let out = dir.path + "/out.tar"
        // Each case: what is refused, the call, and what the error must say.
        let cases: [(String, () throws -> Void, String)] = [
            ("diff output", { try store.diff("x..y", to: out + "\0junk") }, #"output path "\#(out)\0junk""#),
            ("apply-diff input", { _ = try store.applyDiff("x..y", from: out + "\0junk") }, #"tar path "\#(out)\0junk""#),
            ("image name", { _ = try store.importImage(dir.path, name: "web\0junk") }, #"image name "web\0junk""#),
            ("image path", { _ = try store.importImage(dir.path + "\0junk", name: nil) }, #"image path "\#(dir.path)\0junk""#),
        ]
        for (name, call, fragment) in cases {
            do {
                try call()
                Issue.record("\(name): accepted")
            } catch {
                #expect("\(error)".contains(fragment) && "\(error)".contains("NUL"), "\(name): \(error)")
            }
        }
        #expect(!FileManager.default.fileExists(atPath: out))
        let service = LayerService(store: store)
        let mounted = service.handle(LayerRequest(.kernelMount, layer: "x..y", mountpoint: dir.path + "\0junk"))
        #expect(mounted.error?.contains(#"mount point "\#(dir.path)\0junk""#) == true, "\(mounted)")
    }

    /// A damaged layers.db is called corrupt, named, and the advice keeps the pool: the header
    /// overwritten (SQLITE_NOTADB), or the schema page overwritten (SQLITE_CORRUPT). Neither
    /// `layer ls` nor `init` touches the pool, and none of them suggests removing the root.
    @Test(.enabled(if: CLI.available), arguments: [
        (0, "header"),      // "SQLite format 3\0" and the page size: file is not a database
        (100, "schema"),    // page 1's b-tree, which holds the schema: database disk image is malformed
    ])
    func aCorruptDatabaseIsCalledCorrupt(offset: Int, part: String) throws {
        let dir = TempDir()
        try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger).close()
        let db = dir.path + "/layers.db"
        let handle = try #require(FileHandle(forWritingAtPath: db))
        try handle.seek(toOffset: UInt64(offset))
        handle.write(Data(repeating: 0x5a, count: 3000))
        try handle.close()
        let metadata = dir.path + "/pool/metadata"
        let before = try Data(contentsOf: URL(fileURLWithPath: metadata))
        let damaged = try Data(contentsOf: URL(fileURLWithPath: db))

        for args in [["layer", "ls"], ["layer", "rm", "x"], ["init"], ["info"]] {
            let r = try CLI.run(args + ["--root", dir.path])
            #expect(r.status != 0, "\(args) succeeded on a database with its \(part) overwritten")
            #expect(r.stderr.contains("\(db) is corrupt"), "\(args): \(r.stderr)")
            #expect(r.stderr.contains("thinfs pool dump"), "\(args): \(r.stderr)")
            #expect(!r.stderr.contains("not a ThinFS layer store") && !r.stderr.contains("remove \(dir.path)")
                    && !r.stderr.contains("rm -rf"), "\(args): \(r.stderr)")
        }
        do {
            try LayerStore.open(root: dir.path, logger: quietLogger).close()
            Issue.record("a store with a corrupt database opened")
        } catch {
            #expect("\(error)".contains("\(db) is corrupt"), "\(error)")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: metadata)) == before, "the pool's metadata changed")
        #expect(try Data(contentsOf: URL(fileURLWithPath: db)) == damaged, "the damaged database was written to")
        #expect(try Oracle.check(metadata))
    }

    /// A container size above what a thin device can be (`ThinDevice.maximumSize`, Int64.max:
    /// layers.db keeps sizes as SQLite's signed integers). Growing the filesystem recorded it with
    /// `Int64(size)`, which trapped ("Not enough bits to represent the passed value"), taking the
    /// daemon and every mount it serves with it: the control socket's create-rw `size` and
    /// Docker's `--storage-opt size=16777215T` reach it. Now refused before anything is made.
    // The largest multiple of 4K, and the first one above Int64.max.
    @Test(arguments: [UInt64.max - 4095, UInt64(1) << 63])
    func aSizeNoThinDeviceCanHaveIsRefused(size: UInt64) throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        _ = try store.createImageLayer("img", parent: nil)
        let devices = try store.pool.deviceIDs()
        #expect(throws: LayerStore.Error.invalidArgument(what: "size of layer c", value: "\(size)",
                                                         reason: "above the largest a thin device can have (\(ThinDevice.maximumSize) bytes)")) {
            _ = try store.createContainerLayer("c", parent: "img", size: size)
        }
        #expect(try store.layer("c") == nil)
        #expect(try store.pool.deviceIDs() == devices)
    }

    /// A layer's busy lock held with no holder record is, in practice, a copy of a holder's
    /// descriptor in a child being spawned (until its exec closes it) or a holder about to close.
    /// busyHolder called the layer busy at once: under CI's load, containerd's Commit failed
    /// ("held by a process that did not say who it is") while another test spawned processes.
    /// Now a short hold is waited out, and a long one still reported.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/flock")))
    func aLockHeldMomentarilyWithoutARecordIsWaitedOut() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        _ = try store.createImageLayer("img", parent: nil)
        // Waited out: 0.15 s. Reported: 1.5 s, past the wait (about 0.4 s).
        for (hold, busy) in [("0.15", false), ("1.5", true)] {
            let p = try Self.holdWithoutARecord(store, "img", seconds: hold)
            defer { p.waitUntilExit() }
            let holder = try store.busyHolder("img")
            if busy {
                #expect(holder?.pid == 0 && holder?.what.contains("did not say") == true, "a lock held for \(hold) s: \(String(describing: holder))")
            } else {
                #expect(holder == nil, "a lock held for \(hold) s and released was reported: \(String(describing: holder))")
            }
        }
    }

    /// The same moment's hold met by a remove: `claim` failed once and `busyHolder`, which waits
    /// the hold out, then found nobody, so the remove refused the layer as busy "in use" (CI's
    /// SnapshotServiceTests.prepareCommitViewAndStat failed so under load: containerd's Remove of
    /// a committed snapshot while other tests spawned processes). Now the claim is tried again.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/flock")))
    func aRemoveDuringAMomentaryHoldWaitsItOut() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        _ = try store.createImageLayer("img", parent: nil)
        let p = try Self.holdWithoutARecord(store, "img", seconds: "0.15")
        defer { p.waitUntilExit() }
        #expect(try store.remove("img") == .deleted)
        #expect(try store.layer("img") == nil)
    }

    /// flock(1) holding layer `id`'s busy lock shared for `seconds`, with no holder record (as a
    /// child being spawned does), returned once it holds it (the exclusive probe fails).
    static func holdWithoutARecord(_ store: LayerStore, _ id: String, seconds: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        p.arguments = ["-s", store.lockPath(id), "sleep", seconds]
        try p.run()
        let deadline = Date().addingTimeInterval(10)
        while let probe = try store.tryLockExclusive(id), Date() < deadline {
            probe.release()
            usleep(1_000)
        }
        return p
    }

    /// A snapshot key in layers.db is hex. A damaged one (a byte below '0' or past 'f') made
    /// `unhex` compute `c - 48` below zero, which traps: a damaged database took down the daemon
    /// at its first List. Now it is called corrupt, naming the database.
    @Test func aDamagedSnapshotKeyIsACorruptDatabase() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        _ = try store.createSnapshot("k", parent: nil, readOnly: false, labels: [:])
        try store.close()
        let db = try LayerDatabase(path: dir.path + "/layers.db")
        try db.execute("UPDATE snapshots SET key = ?", [.text("!!zz")])
        db.close()
        let reopened = try LayerStore.open(root: dir.path, logger: quietLogger)
        defer { try? reopened.close() }
        do {
            _ = try reopened.allSnapshots()
            Issue.record("a snapshot with a damaged key was listed")
        } catch {
            #expect("\(error)".contains("\(dir.path)/layers.db is corrupt"), "\(error)")
        }
    }

    /// `layer resize` (the control socket's `resize`) takes the same size and stores it the same
    /// way: past the largest thin device it is refused, naming the layer, and the layer keeps its size.
    @Test(arguments: [UInt64.max - 4095, UInt64(Int64.max) + 4097])
    func aResizeNoThinDeviceCanHaveIsRefused(size: UInt64) throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        _ = try store.createImageLayer("img", parent: nil)
        let before = try store.createContainerLayer("c", parent: "img", size: nil).size
        #expect(throws: LayerStore.Error.invalidArgument(what: "size of layer c", value: "\(size)",
                                                         reason: "above the largest a thin device can have (\(ThinDevice.maximumSize) bytes)")) {
            _ = try store.resizeLayer("c", to: size)
        }
        #expect(try store.layer("c")?.size == before)
    }
}

/// `thinfs init` and `thinfs pool create` on bad input: an error is printed and the exit status
/// says so. (Issue 10 reported `Error:` with status 0; no path here reproduced it, so this table
/// guards every refusal we know of.)
@Suite("thinfs init and pool create refusals", .enabled(if: CLI.available && Oracle.available, "needs the thinfs binary"))
struct InitRefusalTests {
    @Test func everyRefusalExitsNonZero() throws {
        let dir = TempDir()
        let store = dir.path + "/store", pool = dir.path + "/pool", file = dir.file("plain", size: 1)
        let small = ["--storage-opt", "dm.basesize=64M", "--storage-opt", "dm.loopdatasize=512M", "--storage-opt", "dm.loopmetadatasize=16M"]
        #expect(try CLI.run(["init", "--root", store] + small).status == 0)
        #expect(try CLI.run(["pool", "create", "--root", pool, "--data-size", "1G", "--metadata-size", "16M"]).status == 0)
        // Each case: the arguments, and what the message must say.
        let cases: [([String], String)] = [
            (["init", "--root", store], "already a ThinFS layer store"),
            (["init", "--root", dir.path + "/a", "--storage-opt", "dm.nosuch=1"], "unknown option"),
            (["init", "--root", dir.path + "/b", "--storage-opt", "dm.basesize=banana"], "not a size"),
            (["init", "--root", dir.path + "/c", "--storage-opt", "dm.loopdatasize=1M"], "out of data space"),
            (["init", "--root", file], "plain"),
            (["init", "--root", dir.path + "/d", "--bogus"], "Unknown option"),
            (["pool", "create", "--root", pool], "already has a pool"),
            (["pool", "create", "--root", dir.path + "/e", "--block-size", "100K"], "block size 100K is invalid"),
            (["pool", "create", "--root", dir.path + "/f", "--metadata-size", "1K"], "metadata size"),
            (["pool", "create", "--root", file], "plain"),
        ]
        for (args, fragment) in cases {
            let r = try CLI.run(args)
            #expect(r.status != 0, "\(args) exited 0: \(r.stdout)\(r.stderr)")
            #expect(r.stderr.hasPrefix("Error:") && r.stderr.contains(fragment), "\(args): \(r.stderr)")
        }
    }
}
