import Foundation
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSExt4

/// The volume's directory cache (name → inode per directory): its own rules, then whether a
/// volume that serves lookups from it ever answers differently from the disk.
@Suite("Directory cache")
struct DirectoryCacheTests {
    static func entry(_ ino: UInt32) -> DirectoryCache.Entry { .init(ino: ino, fileType: 1) }
    static func key(_ s: String) -> [UInt8] { Array(s.utf8) }

    @Test func namesCompareAsBytesNotAsUnicode() {
        var c = DirectoryCache()
        // "é" precomposed and decomposed: equal as Swift Strings, two different names to ext4.
        let composed = "\u{e9}", decomposed = "e\u{301}"
        #expect(composed == decomposed)
        c.store(10, [(Self.key(composed), Self.entry(11))])
        do { let answer = c.lookup(10, Self.key(composed)); #expect(answer == .found(Self.entry(11))) }
        do { let answer = c.lookup(10, Self.key(decomposed)); #expect(answer == .absent) }
        // Bytes that are not UTF-8 are names too.
        c.added(10, [0xff, 0xfe], Self.entry(12))
        do { let answer = c.lookup(10, [0xff, 0xfe]); #expect(answer == .found(Self.entry(12))) }
    }

    @Test func onlyCachedDirectoriesAnswerAndDotsNeverDo() {
        var c = DirectoryCache()
        do { let answer = c.lookup(10, Self.key("a")); #expect(answer == nil, "an uncached directory has no answer") }
        c.added(10, Self.key("a"), Self.entry(11))   // not cached: nothing to update, nothing invented
        do { let answer = c.lookup(10, Self.key("a")); #expect(answer == nil) }
        c.store(10, [(Self.key("."), Self.entry(10)), (Self.key(".."), Self.entry(2)), (Self.key("a"), Self.entry(11))])
        #expect(c.entryCount == 1)
        do { let answer = c.lookup(10, Self.key("..")); #expect(answer == nil, "'..' changes when a directory moves: always read from disk") }
        c.removed(10, Self.key("a"))
        do { let answer = c.lookup(10, Self.key("a")); #expect(answer == .absent) }
        c.drop(10)
        do { let answer = c.lookup(10, Self.key("a")); #expect(answer == nil) }
        #expect(c.entryCount == 0)
    }

    @Test func theLeastRecentlyUsedDirectoriesGoFirstAndTheBudgetHolds() {
        var c = DirectoryCache(capacity: 10)
        func listing(_ n: Int) -> [(name: [UInt8], entry: DirectoryCache.Entry)] { (0..<n).map { (Self.key("f\($0)"), Self.entry(UInt32(100 + $0))) } }
        c.store(1, listing(4))
        c.store(2, listing(4))
        _ = c.lookup(1, Self.key("f0"))   // 1 is now more recent than 2
        c.store(3, listing(4))            // 12 > 10: the least recently used (2) goes
        #expect(c.contains(1) && !c.contains(2) && c.contains(3))
        #expect(c.entryCount == 8)
        // A directory that grows past the budget pushes the others out, then itself.
        for i in 4..<10 { c.added(3, Self.key("f\(i)"), Self.entry(UInt32(100 + i))) }
        #expect(!c.contains(1) && c.contains(3) && c.entryCount == 10)
        c.added(3, Self.key("f10"), Self.entry(110))
        #expect(!c.contains(3) && c.entryCount == 0)
        let stored = c.store(4, listing(11))
        #expect(!stored, "a directory larger than the whole budget is not cached")
        #expect(c.entryCount == 0)
    }
}

/// The cache inside a `Volume`: every lookup must answer what the disk says, whatever ran before.
@Suite("Directory cache in a volume", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct VolumeDirectoryCacheTests {
    func withImage(size: UInt64 = 128 << 20, _ body: (Volume, String) throws -> Void) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: size)
        let volume = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        try body(volume, image)
        try volume.close()
        try E2fsprogs.check(image)
    }

    /// The inode `name` has in `dir`, or nil for ENOENT; other errors are test failures.
    static func ino(_ v: Volume, _ dir: UInt64, _ name: String) throws(VolumeError) -> UInt64? {
        do { return try v.lookup(parent: dir, name: name).ino } catch where error.errno == .noSuchFileOrDirectory { return nil }
    }

    /// What the directory holds on disk: readdir scans the blocks and never reads the cache.
    static func listing(_ v: Volume, _ dir: UInt64) throws -> [String: UInt64] {
        var names: [String: UInt64] = [:]
        try v.readdir(dir, after: 0) { e throws(VolumeError) in
            if e.name != "." && e.name != ".." { names[e.name] = e.ino }
            return true
        }
        return names
    }

    @Test func aDirectoryIsScannedOnceThenAnsweredFromTheCache() throws {
        try withImage { v, image in
            let d = try v.mkdir(parent: v.rootInode, name: "big", mode: 0o755, owner: .root)
            var inos: [UInt64] = []
            for i in 0..<3000 { inos.append(try v.mknod(parent: d.ino, name: "file-\(i)", mode: 0o100644, rdev: 0, owner: .root).ino) }
            let during = try v.directoryCacheCounts
            // The first create scanned "big" (empty then); every other existence check was a probe.
            #expect(during.builds <= 3 && during.hits >= 3000, "\(during)")
            try v.close()

            // A volume opened again starts empty, and builds the directory from the disk in one scan.
            let again = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
            defer { try? again.close() }
            let big = try again.lookup(parent: again.rootInode, name: "big").ino
            for i in stride(from: 2999, through: 0, by: -7) { #expect(try Self.ino(again, big, "file-\(i)") == inos[i]) }
            for i in 3000..<3100 { #expect(try Self.ino(again, big, "file-\(i)") == nil) }
            let after = try again.directoryCacheCounts
            #expect(after.builds == 2 && after.entries == 3000 + 2, "root and big, each scanned once: \(after)")
        }
    }

    @Test func canonicallyEquivalentNamesStayTwoFiles() throws {
        try withImage { v, _ in
            let a = try v.mknod(parent: v.rootInode, name: "caf\u{e9}", mode: 0o100644, rdev: 0, owner: .root)
            #expect(try Self.ino(v, v.rootInode, "cafe\u{301}") == nil)
            let b = try v.mknod(parent: v.rootInode, name: "cafe\u{301}", mode: 0o100644, rdev: 0, owner: .root)
            #expect(a.ino != b.ino)
            try v.unlink(parent: v.rootInode, name: "caf\u{e9}")
            #expect(try Self.ino(v, v.rootInode, "caf\u{e9}") == nil)
            #expect(try Self.ino(v, v.rootInode, "cafe\u{301}") == b.ino)
        }
    }

    /// Each kind of change, then a lookup of every name it touched, in both directories of a rename.
    @Test func everyKindOfChangeIsSeenByTheNextLookup() throws {
        try withImage { v, _ in
            let root = v.rootInode
            let a = try v.mkdir(parent: root, name: "a", mode: 0o755, owner: .root).ino
            let b = try v.mkdir(parent: root, name: "b", mode: 0o755, owner: .root).ino
            // Cache both directories first, so that each change below has to update a cached map.
            #expect(try Self.ino(v, a, "x") == nil && Self.ino(v, b, "x") == nil)

            let f = try v.mknod(parent: a, name: "f", mode: 0o100644, rdev: 0, owner: .root).ino
            #expect(try Self.ino(v, a, "f") == f)
            _ = try v.link(f, newParent: b, newName: "g")
            #expect(try Self.ino(v, b, "g") == f)
            try v.unlink(parent: a, name: "f")
            #expect(try Self.ino(v, a, "f") == nil && Self.ino(v, b, "g") == f)
            try v.rename(parent: b, name: "g", newParent: a, newName: "h", flags: [])
            #expect(try Self.ino(v, b, "g") == nil && Self.ino(v, a, "h") == f)

            let s = try v.symlink(parent: b, name: "s", target: "h", owner: .root).ino
            #expect(try Self.ino(v, b, "s") == s)
            try v.rename(parent: a, name: "h", newParent: b, newName: "s", flags: .exchange)
            #expect(try Self.ino(v, a, "h") == s && Self.ino(v, b, "s") == f)
            let e = #expect(throws: VolumeError.self) { try v.rename(parent: a, name: "h", newParent: b, newName: "s", flags: .noReplace) }
            #expect(e?.errno == .fileExists)
            // Over an existing file: the old target's name now means the moved file.
            try v.rename(parent: a, name: "h", newParent: b, newName: "s", flags: [])
            #expect(try Self.ino(v, a, "h") == nil && Self.ino(v, b, "s") == s)

            let d = try v.mkdir(parent: a, name: "d", mode: 0o755, owner: .root).ino
            #expect(try Self.ino(v, a, "d") == d)
            _ = try v.mknod(parent: d, name: "inside", mode: 0o100644, rdev: 0, owner: .root)
            try v.rename(parent: a, name: "d", newParent: b, newName: "d2", flags: [])
            #expect(try Self.ino(v, a, "d") == nil && Self.ino(v, b, "d2") == d)
            #expect(try Self.ino(v, d, "..") == b, "the moved directory's '..' follows it")
            try v.unlink(parent: d, name: "inside")
            try v.rmdir(parent: b, name: "d2")
            #expect(try Self.ino(v, b, "d2") == nil)
            let fifo = try v.mknod(parent: b, name: "d2", mode: 0o010644, rdev: 0, owner: .root).ino
            #expect(try Self.ino(v, b, "d2") == fifo)

            // Every answer above agrees with what the disk lists.
            for dir in [a, b] {
                let onDisk = try Self.listing(v, dir)
                for (name, ino) in onDisk { #expect(try Self.ino(v, dir, name) == ino) }
            }
        }
    }

    /// A name of `length` bytes (at least its number's digits and a dash), unique for each `i`.
    static func sizedName(_ i: Int, _ length: Int) -> String {
        let stem = "\(i)-"
        return stem.count >= length ? stem : stem + String(repeating: "y", count: length - stem.count)
    }

    /// Seeded churn in one directory: creates, unlinks, renames (within it and over live names),
    /// hard links and creates again, with names from 1 to 255 bytes so that records of every size
    /// split and merge. Returns the model of what the directory must hold.
    static func churn(_ v: Volume, _ dir: UInt64, seed: UInt64, start: Int, rounds: Int,
                      model: inout [String: UInt64]) throws {
        var rng = SeededRandom(seed: seed)
        let lengths = [1, 2, 3, 7, 12, 16, 33, 64, 100, 180, 255]
        var next = start
        func fresh() -> String {
            next += 1
            return sizedName(next, lengths[Int.random(in: 0..<lengths.count, using: &rng)])
        }
        for _ in 0..<rounds {
            for _ in 0..<400 {
                let n = fresh()
                model[n] = try v.mknod(parent: dir, name: n, mode: 0o100644, rdev: 0, owner: .root).ino
            }
            var names = Array(model.keys).sorted()
            names.shuffle(using: &rng)
            for n in names.prefix(names.count / 4) {
                try v.unlink(parent: dir, name: n)
                model[n] = nil
            }
            names = Array(model.keys).sorted()
            names.shuffle(using: &rng)
            for (j, from) in names.prefix(150).enumerated() {
                guard let ino = model[from] else { continue }
                let live = Array(model.keys).sorted()
                let to = j % 4 == 0 ? live[Int.random(in: 0..<live.count, using: &rng)] : fresh()
                try v.rename(parent: dir, name: from, newParent: dir, newName: to, flags: [])
                if model[to] != ino {
                    model[from] = nil
                    model[to] = ino
                }
            }
            for _ in 0..<50 {
                let live = Array(model.keys).sorted()
                let to = fresh()
                model[to] = try v.link(model[live[Int.random(in: 0..<live.count, using: &rng)]]!, newParent: dir, newName: to).ino
            }
        }
    }

    /// Thousands of changes in one directory: every lookup and the disk's listing agree with the
    /// model, before and after the volume is opened again (a new cache, built from the disk), the
    /// directory reuses the room it freed, and e2fsck (in `withImage`) finds it clean.
    @Test func oneLargeDirectoryChurnsAndChecksClean() throws {
        try withImage(size: 256 << 20) { v, image in
            let dir = try v.mkdir(parent: v.rootInode, name: "big", mode: 0o755, owner: .root).ino
            var model: [String: UInt64] = [:]
            try Self.churn(v, dir, seed: 11, start: 0, rounds: 8, model: &model)
            #expect(model.count > 1000)
            #expect(try Self.listing(v, dir) == model)
            for (n, ino) in model { #expect(try Self.ino(v, dir, n) == ino) }
            for n in ["0-", "999999-", Self.sizedName(424_242, 255)] { #expect(try Self.ino(v, dir, n) == nil) }

            // Emptied and filled again with as many entries: the freed room is reused.
            let grown = try v.getattr(dir).size
            let names = Array(model.keys)
            for n in names { try v.unlink(parent: dir, name: n) }
            #expect(try Self.listing(v, dir).isEmpty)
            for n in names { model[n] = try v.mknod(parent: dir, name: n, mode: 0o100644, rdev: 0, owner: .root).ino }
            #expect(try v.getattr(dir).size == grown, "the same names fit in the same blocks")
            try v.close()

            let again = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
            defer { try? again.close() }
            #expect(try Self.listing(again, dir) == model)
            try Self.churn(again, dir, seed: 12, start: 1_000_000, rounds: 2, model: &model)
            #expect(try Self.listing(again, dir) == model)
            for (n, ino) in model { #expect(try Self.ino(again, dir, n) == ino) }
            try again.close()
            try E2fsprogs.check(image)
        }
    }

    /// A directory with an htree index (e2fsck -D builds one, as kernel ext4 does) keeps its
    /// entries in hash order, so libext2fs's dx_link adds to it; the volume must still answer
    /// every lookup from its cache correctly and leave the index consistent.
    @Test func anIndexedDirectoryChurnsAndChecksClean() throws {
        let tmp = TempDir()
        let image = tmp.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 256 << 20)
        var model: [String: UInt64] = [:]
        var dir: UInt64 = 0
        do {
            let v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
            dir = try v.mkdir(parent: v.rootInode, name: "indexed", mode: 0o755, owner: .root).ino
            for i in 0..<1500 { model["f\(i)"] = try v.mknod(parent: dir, name: "f\(i)", mode: 0o100644, rdev: 0, owner: .root).ino }
            try v.close()
        }
        let rehash = try Oracle.run("/sbin/e2fsck", ["-fyD", image])
        #expect(rehash.status <= 1, "e2fsck -fyD: \(rehash.stdout)")
        let v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        #expect(try Self.listing(v, dir) == model)
        try Self.churn(v, dir, seed: 13, start: 5000, rounds: 3, model: &model)
        #expect(try Self.listing(v, dir) == model)
        for (n, ino) in model { #expect(try Self.ino(v, dir, n) == ino) }
        try v.close()
        try E2fsprogs.check(image)
    }

    /// A directory whose inode number comes back for a new directory starts empty.
    @Test func aRemovedDirectorysNumberComesBackEmpty() throws {
        try withImage { v, _ in
            var reused = 0
            for round in 0..<20 {
                let d = try v.mkdir(parent: v.rootInode, name: "d\(round)", mode: 0o755, owner: .root).ino
                for i in 0..<50 { _ = try v.mknod(parent: d, name: "f\(i)", mode: 0o100644, rdev: 0, owner: .root) }
                #expect(try Self.ino(v, d, "f7") != nil)
                for i in 0..<50 { try v.unlink(parent: d, name: "f\(i)") }
                try v.rmdir(parent: v.rootInode, name: "d\(round)")
                let e = try v.mkdir(parent: v.rootInode, name: "e\(round)", mode: 0o755, owner: .root).ino
                if e == d { reused += 1 }
                #expect(try Self.ino(v, e, "f7") == nil)
                #expect(try Self.listing(v, e).isEmpty)
                try v.rmdir(parent: v.rootInode, name: "e\(round)")
            }
            #expect(reused > 0, "the test needs ext2fs_new_inode to hand a freed number out again")
        }
    }

    /// One thread's share of the churn: its own names in the shared directories, and the model
    /// of what each of them must be.
    struct Churner {
        let v: Volume
        let dirs: [UInt64]
        let thread: Int
        var rng: SeededRandom
        /// Directory index → name → inode, for this thread's names only.
        var model: [[String: UInt64]]
        var failures: [String] = []

        init(_ v: Volume, dirs: [UInt64], thread: Int) {
            self.v = v
            self.dirs = dirs
            self.thread = thread
            rng = SeededRandom(seed: 0x5eed + UInt64(thread))
            model = Array(repeating: [:], count: dirs.count)
        }

        mutating func fail(_ s: String) { failures.append("thread \(thread): \(s)") }

        mutating func verify(_ d: Int, _ n: String, _ what: String) {
            do {
                let got = try VolumeDirectoryCacheTests.ino(v, dirs[d], n)
                if got != model[d][n] { fail("after \(what): \(d)/\(n) is \(String(describing: got)), expected \(String(describing: model[d][n]))") }
            } catch { fail("after \(what): lookup \(d)/\(n) failed: \(error)") }
        }

        /// Expects `body` to fail with `errno`.
        mutating func expectFailure(_ errno: Errno, _ what: String, _ body: () throws(VolumeError) -> Void) {
            do {
                try body()
                fail("\(what) succeeded")
            } catch where error.errno == errno {
            } catch {
                fail("\(what): \(error)")
            }
        }

        mutating func step(_ step: Int) throws(VolumeError) {
            let names = (0..<2).map { _ in "t\(thread)-\(Int.random(in: 0..<10, using: &rng))" }
            let d1 = Int.random(in: 0..<2, using: &rng), d2 = Int.random(in: 0..<2, using: &rng)
            let (n1, n2) = (names[0], names[1])
            let what = "step \(step)"
            let (a, b) = (dirs[d1], dirs[d2])
            switch Int.random(in: 0..<8, using: &rng) {
            case 0, 1:
                if model[d1][n1] == nil {
                    model[d1][n1] = try v.mknod(parent: a, name: n1, mode: 0o100644, rdev: 0, owner: .root).ino
                } else {
                    let v = v
                    expectFailure(.fileExists, "\(what): a second create of \(n1)") { () throws(VolumeError) in
                        _ = try v.mknod(parent: a, name: n1, mode: 0o100644, rdev: 0, owner: .root)
                    }
                }
            case 2:
                if model[d1][n1] != nil {
                    try v.unlink(parent: a, name: n1)
                    model[d1][n1] = nil
                } else {
                    let v = v
                    expectFailure(.noSuchFileOrDirectory, "\(what): unlink of missing \(n1)") { () throws(VolumeError) in
                        try v.unlink(parent: a, name: n1)
                    }
                }
            case 3:
                if let ino = model[d1][n1], model[d2][n2] == nil {
                    _ = try v.link(ino, newParent: b, newName: n2)
                    model[d2][n2] = ino
                }
            case 4, 5:
                if let ino = model[d1][n1], d1 != d2 || n1 != n2 {
                    try v.rename(parent: a, name: n1, newParent: b, newName: n2, flags: [])
                    // Two links to one inode: POSIX rename does nothing.
                    if model[d2][n2] != ino {
                        model[d1][n1] = nil
                        model[d2][n2] = ino
                    }
                }
            case 6:
                if let x = model[d1][n1], let y = model[d2][n2], d1 != d2 || n1 != n2 {
                    try v.rename(parent: a, name: n1, newParent: b, newName: n2, flags: .exchange)
                    model[d1][n1] = y
                    model[d2][n2] = x
                } else if model[d1][n1] == nil {
                    model[d1][n1] = try v.symlink(parent: a, name: n1, target: "to-\(step)", owner: .root).ino
                }
            default:
                // A subdirectory's life, under a name no one else uses.
                let sub = "t\(thread)-dir"
                let s = try v.mkdir(parent: a, name: sub, mode: 0o755, owner: .root).ino
                for i in 0..<5 { _ = try v.mknod(parent: s, name: "f\(i)", mode: 0o100644, rdev: 0, owner: .root) }
                if try VolumeDirectoryCacheTests.ino(v, s, "f3") == nil { fail("\(what): f3 missing in a new subdirectory") }
                try v.rename(parent: s, name: "f3", newParent: s, newName: "g3", flags: [])
                let (f3, g3) = (try VolumeDirectoryCacheTests.ino(v, s, "f3"), try VolumeDirectoryCacheTests.ino(v, s, "g3"))
                if f3 != nil || g3 == nil {
                    fail("\(what): a rename within a subdirectory was not seen")
                }
                for n in ["f0", "f1", "f2", "g3", "f4"] { try v.unlink(parent: s, name: n) }
                try v.rmdir(parent: a, name: sub)
                if try VolumeDirectoryCacheTests.ino(v, a, sub) != nil { fail("\(what): a removed subdirectory is still found") }
            }
            verify(d1, n1, what)
            verify(d2, n2, what)
            if step % 100 == 0 {
                for d in 0..<2 { for k in 0..<10 { verify(d, "t\(thread)-\(k)", what) } }
            }
        }
    }

    /// Several threads change two shared directories at once. Each owns its names, so it knows
    /// what every lookup of them must answer, while the others churn the same maps: creates,
    /// hard links, renames between the two directories and within one (over existing files and
    /// exchanging), unlinks, symlinks, and subdirectories made, filled, emptied and removed.
    @Test func threadsChurningSharedDirectoriesNeverSeeAStaleEntry() throws {
        try withImage(size: 256 << 20) { v, _ in
            let root = v.rootInode
            let dirs = [try v.mkdir(parent: root, name: "A", mode: 0o755, owner: .root).ino,
                        try v.mkdir(parent: root, name: "B", mode: 0o755, owner: .root).ino]
            // Some bulk, so that the shared directories span many blocks.
            for i in 0..<2000 { _ = try v.mknod(parent: dirs[i % 2], name: "bulk-\(i)", mode: 0o100644, rdev: 0, owner: .root) }
            let threads = 4, operations = 1500
            let results = Mutex<[Int: (model: [[String: UInt64]], failures: [String])]>([:])
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                var churner = Churner(v, dirs: dirs, thread: t)
                for step in 0..<operations {
                    do throws(VolumeError) { try churner.step(step) } catch { churner.fail("step \(step): \(error)") }
                }
                let done = churner
                results.withLock { $0[t] = (done.model, done.failures) }
            }
            let all = results.withLock { $0 }
            let problems = all.values.flatMap(\.failures)
            #expect(problems.isEmpty, "\(problems.prefix(20).joined(separator: "\n"))")

            // The disk, scanned without the cache, holds exactly what the threads' models say,
            // and every link count matches the names that point at the inode.
            var links: [UInt64: UInt32] = [:]
            for d in 0..<2 {
                let expected = all.values.reduce(into: [String: UInt64]()) { $0.merge($1.model[d]) { x, _ in x } }
                let onDisk = try Self.listing(v, dirs[d]).filter { !$0.key.hasPrefix("bulk-") }
                #expect(onDisk == expected, "directory \(d)")
                for ino in expected.values { links[ino, default: 0] += 1 }
            }
            for (ino, n) in links { #expect(try v.getattr(ino).nlink == n, "inode \(ino)") }
            let counts = try v.directoryCacheCounts
            #expect(counts.hits > UInt64(threads * operations), "the lookups were served by the cache: \(counts)")
        }
    }
}
