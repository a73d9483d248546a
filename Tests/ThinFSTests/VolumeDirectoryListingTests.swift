import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// readdir cookies under change, and times at the edges of ext4's range.
extension VolumeTests {
    /// Names long enough that 300 of them span several directory blocks.
    static func debName(_ i: Int) -> String { "package-\(i)_1.0-1_amd64.deb" }

    /// Lists `dir` in batches of `batch` entries, calling `between` after each batch with the batch;
    /// returns every name returned, in order, "." and ".." left out.
    static func listInBatches(_ v: Volume, _ dir: UInt64, batch: Int,
                              between: ([DirectoryEntry]) throws -> Void) throws -> [String] {
        var cookie: UInt64 = 0
        var seen: [String] = []
        while true {
            var got: [DirectoryEntry] = []
            try v.readdir(dir, after: cookie) { got.append($0); return got.count < batch }
            guard let last = got.last else { return seen }
            cookie = last.cookie
            seen += got.map(\.name).filter { $0 != "." && $0 != ".." }
            try between(got)
        }
    }

    /// `apt-get clean`, `rm -r` and a Perl opendir/readdir/unlink loop: each entry is removed as soon as
    /// it is returned. POSIX: an entry neither added nor removed during the listing is returned exactly
    /// once, so every one of the 300 comes back and the directory ends empty.
    @Test func listingWhileUnlinkingEachEntryReturnsEveryEntryOnce() throws {
        try withImage { v, _ in
            let dir = try v.mkdir(parent: v.rootInode, name: "archives", mode: 0o755, owner: .root).ino
            let names = (0..<300).map(Self.debName)
            for name in names { _ = try v.mknod(parent: dir, name: name, mode: 0o100644, rdev: 0, owner: .root) }

            let seen = try Self.listInBatches(v, dir, batch: 7) { batch in
                for e in batch where e.name != "." && e.name != ".." { try v.unlink(parent: dir, name: e.name) }
            }
            #expect(seen.count == names.count, "returned \(seen.count) of \(names.count) entries")
            let missing = Set(names).subtracting(seen)
            #expect(missing.isEmpty, "\(missing.count) never returned, e.g. \(missing.sorted().prefix(3))")
            var left: [String] = []
            try v.readdir(dir, after: 0) { left.append($0.name); return true }
            #expect(Set(left) == [".", ".."] && left.count == 2, "\(left.count - 2) entries left")
        }
    }

    /// A reader that never deletes, while someone else removes a known third of the entries (some already
    /// listed, some not yet) and creates new ones: each survivor comes back exactly once, nothing comes
    /// back twice, and a removed or new entry at most once.
    @Test func listingWhileOthersUnlinkAndCreateSeesEverySurvivorOnce() throws {
        try withImage { v, _ in
            let dir = try v.mkdir(parent: v.rootInode, name: "d", mode: 0o755, owner: .root).ino
            let names = (0..<300).map(Self.debName)
            for name in names { _ = try v.mknod(parent: dir, name: name, mode: 0o100644, rdev: 0, owner: .root) }
            // Every third entry goes, alternating from the front and the back of the directory.
            var doomed = stride(from: 0, to: 300, by: 3).map { names[$0] }
            let removed = Set(doomed)
            doomed = zip(doomed, doomed.reversed()).flatMap { [$0, $1] }.prefix(doomed.count).map { $0 }
            var created: Set<String> = []
            var gone: Set<String> = []

            let seen = try Self.listInBatches(v, dir, batch: 10) { _ in
                for _ in 0..<4 {
                    guard let name = doomed.first(where: { !gone.contains($0) }) else { break }
                    try v.unlink(parent: dir, name: name)
                    gone.insert(name)
                }
                // New entries go at the end: creating some after every batch would never let the listing end.
                for _ in 0..<3 where created.count < 100 {
                    let name = "new-\(created.count)-with-a-long-name"
                    _ = try v.mknod(parent: dir, name: name, mode: 0o100644, rdev: 0, owner: .root)
                    created.insert(name)
                }
            }
            #expect(gone == removed, "the whole subset was removed during the listing")
            var counts: [String: Int] = [:]
            for name in seen { counts[name, default: 0] += 1 }
            let survivors = Set(names).subtracting(removed)
            let missing = survivors.filter { counts[$0] == nil }.sorted()
            #expect(missing.isEmpty, "\(missing.count) of \(survivors.count) survivors never returned: \(missing.prefix(5))")
            let twice = counts.filter { $0.value > 1 }.keys.sorted()
            #expect(twice.isEmpty, "returned more than once: \(twice.prefix(5))")
            let unknown = Set(counts.keys).subtracting(names).subtracting(created)
            #expect(unknown.isEmpty, "returned names never created: \(unknown)")
        }
    }

    /// With the inline_data feature a small directory lives in its inode (i_block, then the system.data
    /// xattr) until it grows into a block: cookies hold in both forms, and across the growth.
    @Test func inlineDataDirectoryListingWhileUnlinkingAndGrowing() throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        _ = dir.file("fs.img", size: 64 << 20)
        let mk = try Oracle.run("/sbin/mke2fs", ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "inline_data", "-F", "-q",
                                                 "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", image])
        try #require(mk.status == 0, "mke2fs: \(mk.stderr)")
        let v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        let d = try v.mkdir(parent: v.rootInode, name: "small", mode: 0o755, owner: .root).ino
        // Eight short names fill i_block and spill into the xattr; the directory stays inline.
        let names = (0..<8).map { "f\($0)" }
        for name in names { _ = try v.mknod(parent: d, name: name, mode: 0o100644, rdev: 0, owner: .root) }
        var listed: [String] = []
        try v.readdir(d, after: 0) { listed.append($0.name); return true }
        #expect(Set(listed) == Set(names + [".", ".."]) && listed.count == names.count + 2)

        // Unlink each entry as it is returned, adding a long-named one each time (the directory
        // grows into a block on the way): every original comes back exactly once.
        var added: [String] = []
        let seen = try Self.listInBatches(v, d, batch: 2) { batch in
            for e in batch where e.name.hasPrefix("f") { try v.unlink(parent: d, name: e.name) }
            guard added.count < 8 else { return }
            let name = "added-\(added.count)-" + String(repeating: "x", count: 40)
            _ = try v.mknod(parent: d, name: name, mode: 0o100644, rdev: 0, owner: .root)
            added.append(name)
        }
        let originals = seen.filter { $0.hasPrefix("f") }
        #expect(originals.sorted() == names.sorted(), "originals returned: \(originals)")
        #expect(Set(seen).count == seen.count, "some returned twice: \(seen)")
        var left: [String] = []
        try v.readdir(d, after: 0) { left.append($0.name); return true }
        #expect(Set(left) == Set(added + [".", ".."]))
        try v.close()
        try E2fsprogs.check(image)
    }

    /// ext4 stores 34 bits of seconds from -2^31 (with the extra epoch bits of 256-byte inodes); the kernel
    /// clamps a time set outside that range to its bounds, with 0 ns at a bound (fs/inode.c
    /// timestamp_truncate, fs/ext4/ext4.h EXT4_EXTRA_TIMESTAMP_MAX). What getattr says right after the
    /// change is what it says after the filesystem is closed and opened again.
    @Test(arguments: [
        // (set, expected): within range, both kept exactly.
        (Timestamp(seconds: 15_032_385_534, nanoseconds: 5), Timestamp(seconds: 15_032_385_534, nanoseconds: 5)),
        (Timestamp(seconds: -2_147_483_647, nanoseconds: 7), Timestamp(seconds: -2_147_483_647, nanoseconds: 7)),
        // 2^34: past the top; used to read back as 0.
        (Timestamp(seconds: 1 << 34, nanoseconds: 123), Timestamp(seconds: 15_032_385_535, nanoseconds: 0)),
        // One past the top; used to read back as -2^31.
        (Timestamp(seconds: 15_032_385_536, nanoseconds: 0), Timestamp(seconds: 15_032_385_535, nanoseconds: 0)),
        // The top itself: the kernel drops the nanoseconds at a bound.
        (Timestamp(seconds: 15_032_385_535, nanoseconds: 999), Timestamp(seconds: 15_032_385_535, nanoseconds: 0)),
        // 100 s before the bottom; used to read back in the year 2446.
        (Timestamp(seconds: -2_147_483_748, nanoseconds: 1), Timestamp(seconds: -2_147_483_648, nanoseconds: 0)),
    ])
    func timesOutsideExt4RangeAreClampedWhenSet(_ set: Timestamp, _ expected: Timestamp) throws {
        let dir = TempDir()
        let image = dir.path + "/fs.img"
        try E2fsprogs.mkfs(image, size: 64 << 20)
        var v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: false, logger: quietLogger)
        let ino = try v.mknod(parent: v.rootInode, name: "f", mode: 0o100644, rdev: 0, owner: .root).ino
        let now = try v.setattr(ino, AttributeChanges(atime: .set(set), mtime: .set(set), ctime: set))
        #expect(now.mtime == expected && now.atime == expected && now.ctime == expected)
        try v.close()
        v = try Volume(device: FileBlockDevice(path: FilePath(image)), readOnly: true, logger: quietLogger)
        let later = try v.getattr(ino)
        #expect(later.mtime == now.mtime && later.atime == now.atime && later.ctime == now.ctime)
        try v.close()
        try E2fsprogs.check(image)
    }
}
