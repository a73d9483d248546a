import Foundation
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// Names as bytes, for trees and tar listings: Swift's String equality is canonical equivalence, under which
/// "café" composed (NFC) and decomposed (NFD) are equal, while ext4 and tar hold them as two names.
struct ByteTree {
    struct Node: Equatable, CustomStringConvertible {
        var mode: UInt32
        var uid: UInt32
        var gid: UInt32
        var mtime: Timestamp?
        var target: [UInt8]?
        var content: [UInt8]?
        var xattrs: [[UInt8]: [UInt8]]
        var linkGroup: [UInt8]?
        var description: String {
            "mode \(String(mode, radix: 8)) \(uid):\(gid) mtime \(String(describing: mtime)) -> \(target.map(ByteTree.hex) ?? "-") "
                + "\(content?.count ?? 0) bytes xattrs \(xattrs.keys.map(ByteTree.hex).sorted()) link \(linkGroup.map(ByteTree.hex) ?? "-")"
        }
    }

    static func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }
    static func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// Every node of `v` by path bytes (the root's lost+found left out).
    static func snapshot(_ v: FileSystemVolume) throws -> [[UInt8]: Node] {
        var nodes: [[UInt8]: Node] = [:]
        var inodes: [UInt64: [[UInt8]]] = [:]
        func walk(_ ino: UInt64, _ path: [UInt8]) throws {
            var entries: [DirectoryEntry] = []
            try v.readdir(ino, after: 0) { e in
                if e.name != "." && e.name != ".." { entries.append(e) }
                return true
            }
            for e in entries {
                if path.isEmpty && e.name == "lost+found" { continue }
                let p = path + Array("/".utf8) + bytes(e.name)
                #expect(nodes[p] == nil, "two entries named \(hex(p))")
                let a = try v.getattr(e.ino)
                var x: [[UInt8]: [UInt8]] = [:]
                for n in try v.listxattr(e.ino) { x[bytes(n)] = try v.getxattr(e.ino, name: n) }
                var content: [UInt8]?
                if a.isRegular {
                    var data = [UInt8](repeating: 0, count: Int(a.size))
                    _ = try data.withUnsafeMutableBytes { try v.read(e.ino, at: 0, into: $0) }
                    content = data
                }
                nodes[p] = Node(mode: a.mode, uid: a.uid, gid: a.gid, mtime: a.isSymlink ? nil : a.mtime,
                                target: a.isSymlink ? bytes(try v.readlink(e.ino)) : nil, content: content, xattrs: x, linkGroup: nil)
                if !a.isDirectory && a.nlink > 1 { inodes[a.ino, default: []].append(p) }
                if a.isDirectory { try walk(e.ino, p) }
            }
        }
        try walk(v.rootInode, [])
        for (_, paths) in inodes {
            let first = paths.min { $0.lexicographicallyPrecedes($1) }!
            for p in paths { nodes[p]!.linkGroup = first }
        }
        return nodes
    }

    static func expectEqual(_ a: [[UInt8]: Node], _ b: [[UInt8]: Node], _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        for p in Set(a.keys).union(b.keys).sorted(by: { $0.lexicographicallyPrecedes($1) }) where a[p] != b[p] {
            let left = a[p].map(\.description) ?? "absent", right = b[p].map(\.description) ?? "absent"
            let message = "\(what): \(hex(p)) (\(String(decoding: p, as: UTF8.self)))\n  left:  \(left)\n  right: \(right)"
            Issue.record(Comment(rawValue: message), sourceLocation: sourceLocation)
        }
    }
}

/// A tar as python3's tarfile (an independent reader) sees it: names and link targets as bytes.
enum PyTarListing {
    struct Member: Equatable {
        var type: String
        var linkname: [UInt8]
        var pax: [String: [UInt8]]
    }

    static func read(_ tar: String) throws -> [[UInt8]: Member] {
        // surrogateescape hands back any byte the UTF-8 decoding could not take, so nothing is repaired.
        let script = """
        import sys, tarfile, json
        t = tarfile.open(sys.argv[1], encoding="utf-8", errors="surrogateescape")
        b = lambda s: s.encode("utf-8", "surrogateescape").hex() if isinstance(s, str) else s.hex()
        kinds = {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "sym", tarfile.LNKTYPE: "hard",
                 tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk", tarfile.FIFOTYPE: "fifo"}
        out = [[b(m.name), kinds.get(m.type, repr(m.type)), b(m.linkname), {k: b(v) for k, v in m.pax_headers.items()}] for m in t]
        print(json.dumps(out))
        """
        let r = try Oracle.run("/usr/bin/env", ["python3", "-c", script, tar])
        guard r.status == 0 else { throw Oracle.OracleError.failed("python3 tarfile: \(r.stderr)") }
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[Any]])
        var members: [[UInt8]: Member] = [:]
        for row in rows {
            let name = unhex(row[0] as? String ?? "")
            #expect(members[name] == nil, "\(tar) holds \(ByteTree.hex(name)) twice")
            let pax = (row[3] as? [String: String] ?? [:]).mapValues(unhex)
            members[name] = Member(type: row[1] as? String ?? "?", linkname: unhex(row[2] as? String ?? ""), pax: pax)
        }
        return members
    }

    static func unhex(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex {
            let j = s.index(i, offsetBy: 2)
            out.append(UInt8(s[i..<j], radix: 16)!)
            i = j
        }
        return out
    }
}

@Suite("Layer diff: non-ASCII names, link targets and xattrs, sockets", .enabled(if: E2fsprogs.available && PyTar.available, "needs e2fsprogs and python3"))
struct LayerDiffNamesTests {
    // Names from the field: ca-certificates' file, and the composed and decomposed spellings of one word,
    // which ext4 holds as two names.
    static let netlock = "NetLock_Arany_=Class_Gold=_F\u{151}tan\u{FA}s\u{ED}tv\u{E1}ny"
    static let nfc = "caf\u{E9}.txt"
    static let nfd = "cafe\u{301}.txt"

    func diff(_ child: ScratchVolume, _ parent: ScratchVolume?) throws -> String {
        let tar = child.dir.path + "/diff-\(UUID().uuidString).tar"
        let fd = try FileDescriptor.open(tar, .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        _ = try fd.closeAfter { try LayerDiffer(child: child.volume, parent: parent?.volume, logger: quietLogger).write(fd: fd.rawValue, name: tar) }
        return tar
    }

    @Test func nonASCIINamesLinkTargetsAndXattrsRoundTripByteForByte() throws {
        let parent = try ScratchVolume()
        let lower = parent.dir.path + "/lower.tar"
        try PyTar.make(lower, """
        dir("etc"); dir("etc/ssl"); dir("etc/ssl/certs")
        reg("old-\u{E9}t\u{E9}", b"removed in the child")
        """)
        try parent.apply(lower)
        let child = try parent.copy()
        let v = child.volume
        func ino(_ p: String) throws -> UInt64 { p.isEmpty ? v.rootInode : try #require(try child.attributes(p)).ino }
        func file(_ dir: String, _ name: String, _ text: String) throws -> UInt64 {
            let f = try v.mknod(parent: try ino(dir), name: name, mode: 0o100644, rdev: 0, owner: .root)
            _ = try Array(text.utf8).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }
            return f.ino
        }
        let cafe = try file("", Self.nfc, "composed")
        _ = try file("", Self.nfd, "decomposed")
        _ = try v.symlink(parent: v.rootInode, name: "l", target: Self.nfc, owner: .root)
        _ = try v.symlink(parent: v.rootInode, name: "l-nfd", target: Self.nfd, owner: .root)
        _ = try v.link(cafe, newParent: v.rootInode, newName: "lien-\u{E9}")
        _ = try v.mkdir(parent: v.rootInode, name: "usr", mode: 0o755, owner: .root)
        let crt = try file("usr", Self.netlock + ".crt", "-----BEGIN CERTIFICATE-----\n")
        _ = try v.symlink(parent: try ino("etc/ssl/certs"), name: Self.netlock + ".pem", target: "/usr/" + Self.netlock + ".crt", owner: .root)
        _ = try v.mkdir(parent: v.rootInode, name: "r\u{E9}pertoire-\u{65E5}\u{672C}", mode: 0o700, owner: Owner(uid: 1000, gid: 1000))
        _ = try file("r\u{E9}pertoire-\u{65E5}\u{672C}", "\u{1F642}", "four-byte name")
        // An xattr value that is not text, and an xattr name that is not ASCII.
        let comment = Array("\u{FC}n\u{EF}c\u{F6}d\u{E9}".utf8) + [0xff, 0, 0xfe]
        try v.setxattr(crt, name: "user.comment", value: comment, flags: [])
        try v.setxattr(cafe, name: "user.\u{E9}t\u{E9}", value: [1, 2, 3], flags: [])
        try v.unlink(parent: v.rootInode, name: "old-\u{E9}t\u{E9}")

        let tar = try diff(child, parent)

        // GNU tar lists every name, with no hdrcharset=BINARY keyword to complain about (it does say it skips
        // libarchive's own LIBARCHIVE.xattr records).
        let gnu = try Oracle.run("/bin/tar", ["-tvf", tar])
        #expect(gnu.status == 0 && !gnu.stderr.contains("hdrcharset"), "\(gnu.stderr)")
        for name in [Self.nfc, Self.nfd, "l -> \(Self.nfc)", "l-nfd -> \(Self.nfd)", "lien-\u{E9} link to \(Self.nfc)",
                     Self.netlock + ".pem -> /usr/" + Self.netlock + ".crt", "\u{1F642}", ".wh.old-\u{E9}t\u{E9}"] {
            #expect(gnu.stdout.contains(name), "GNU tar lists \(name):\n\(gnu.stdout)")
        }

        // python's tarfile, byte for byte: names, link targets, plain UTF-8 path records, binary xattr values.
        let b = ByteTree.bytes
        let members = try PyTarListing.read(tar)
        #expect(members[b(Self.nfc)]?.type == "reg")
        #expect(members[b(Self.nfd)]?.type == "reg", "the decomposed name is its own entry, not normalized away")
        #expect(members[b(Self.nfc)]?.pax["path"] == b(Self.nfc))
        #expect(members.values.allSatisfy { $0.pax["hdrcharset"] == nil })
        #expect(members[b("l")]?.type == "sym" && members[b("l")]?.linkname == b(Self.nfc))
        #expect(members[b("l-nfd")]?.linkname == b(Self.nfd))
        #expect(members[b("lien-\u{E9}")]?.type == "hard" && members[b("lien-\u{E9}")]?.linkname == b(Self.nfc))
        #expect(members[b("etc/ssl/certs/" + Self.netlock + ".pem")]?.linkname == b("/usr/" + Self.netlock + ".crt"))
        #expect(members[b("r\u{E9}pertoire-\u{65E5}\u{672C}/\u{1F642}")]?.type == "reg")
        #expect(members[b("usr/" + Self.netlock + ".crt")]?.pax["SCHILY.xattr.user.comment"] == comment)
        #expect(members[b(".wh.old-\u{E9}t\u{E9}")]?.type == "reg")

        // GNU tar extracts the same bytes onto the host filesystem.
        let out = child.dir.path + "/x"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let x = try Oracle.run("/bin/tar", ["-xf", tar, "-C", out])
        #expect(x.status == 0, "\(x.stderr)")
        #expect(Array(try FileManager.default.destinationOfSymbolicLink(atPath: out + "/l-nfd").utf8) == b(Self.nfd))
        let top = Set(try FileManager.default.contentsOfDirectory(atPath: out).map { Array($0.utf8) })
        #expect(top.contains(b(Self.nfc)) && top.contains(b(Self.nfd)) && top.contains(b("lien-\u{E9}")))

        // Applied to a fresh copy of the parent, it gives the child's tree, byte for byte.
        let fresh = try parent.copy()
        try fresh.apply(tar)
        let expected = try ByteTree.snapshot(child.volume)
        #expect(expected[b("/" + Self.nfc)] != nil && expected[b("/" + Self.nfd)] != nil)
        ByteTree.expectEqual(try ByteTree.snapshot(fresh.volume), expected, "parent + diff vs child")

        // The full-tree diff onto an empty filesystem too.
        let full = try diff(child, nil)
        let empty = try ScratchVolume()
        try empty.apply(full)
        ByteTree.expectEqual(try ByteTree.snapshot(empty.volume), expected, "full diff vs child")
        for s in [parent, child, fresh, empty] { try s.closeAndCheck() }
    }

    /// libarchive converts names through the calling thread's LC_CTYPE and, from UTF-8, normalizes them to NFC.
    /// The reader keeps the bytes the archive holds whatever locale the thread (or the process) has set.
    @Test func readerKeepsNamesAsStoredUnderAUTF8Locale() throws {
        let dir = TempDir()
        let tar = dir.path + "/nfd.tar"
        try PyTar.make(tar, "reg('\(Self.nfd)', b'x'); sym('l', '\(Self.nfd)'); hard('h', '\(Self.nfd)')")
        let utf8 = try #require(newlocale(Int32(LC_CTYPE_MASK), "C.UTF-8", nil))
        defer { freelocale(utf8) }
        let saved = uselocale(utf8)
        defer { uselocale(saved) }
        let reader = try ArchiveReader(path: tar)
        var read: [[UInt8]] = []
        while let e = try reader.next() {
            read.append(Array(e.path.utf8))
            read.append(Array((e.symlinkTarget ?? e.hardlinkTarget ?? "").utf8))
        }
        let b = ByteTree.bytes
        #expect(read == [b(Self.nfd), [], b("l"), b(Self.nfd), b("h"), b(Self.nfd)])
    }

    /// A unix socket cannot be in a tar (pax has no type for it): left out, as moby's archive code leaves it
    /// out, and where the parent has something under that name, that is whited out.
    @Test func socketsAreLeftOutOfTheDiff() throws {
        let parent = try ScratchVolume()
        let lower = parent.dir.path + "/lower.tar"
        try PyTar.make(lower, """
        dir("run"); reg("run/was-file", b"a socket in the child"); reg("run/kept", b"k")
        """)
        try parent.apply(lower)
        _ = try parent.volume.mknod(parent: try #require(try parent.attributes("run")).ino, name: "old.sock", mode: 0o140755, rdev: 0, owner: .root)
        let child = try parent.copy()
        let v = child.volume
        let run = try #require(try child.attributes("run")).ino
        _ = try v.mknod(parent: run, name: "daemon.sock", mode: 0o140755, rdev: 0, owner: .root)
        let sock = try v.mknod(parent: v.rootInode, name: "top.sock", mode: 0o140700, rdev: 0, owner: .root)
        _ = try v.link(sock.ino, newParent: run, newName: "top.sock.link")
        try v.unlink(parent: run, name: "was-file")
        _ = try v.mknod(parent: run, name: "was-file", mode: 0o140600, rdev: 0, owner: .root)
        let f = try v.mknod(parent: run, name: "new", mode: 0o100644, rdev: 0, owner: .root)
        _ = try Array("n".utf8).withUnsafeBytes { try v.write(f.ino, at: 0, from: $0) }

        let tar = try diff(child, parent)
        let members = try PyTarListing.read(tar)
        let b = ByteTree.bytes
        // (tarfile drops a directory name's trailing slash.)
        #expect(Set(members.keys) == [b("."), b("run"), b("run/.wh.was-file"), b("run/new")],
                "\(members.keys.map { String(decoding: $0, as: UTF8.self) }.sorted())")

        let fresh = try parent.copy()
        try fresh.apply(tar)
        #expect(try fresh.names("run") == ["kept", "new", "old.sock"])
        #expect(try fresh.names("").subtracting(["lost+found"]) == ["run"])

        // The whole tree with no parent: the sockets are left out there too.
        let full = try diff(child, nil)
        #expect(try PyTarListing.read(full).keys.contains { String(decoding: $0, as: UTF8.self).contains("sock") } == false)
        for s in [parent, child, fresh] { try s.closeAndCheck() }
    }

    /// ext4 names are bytes; the Volume API's are Strings, which cannot hold a byte that is not UTF-8. Such a
    /// name (made here with debugfs, as a kernel mount could) is refused by name, not written under another.
    @Test func namesAndTargetsThatAreNotUTF8AreRefusedByName() throws {
        for (command, path) in [("mkdir dir\u{1}", "dir\u{FFFD}"), ("symlink sl tgt\u{2}", "sl")] {
            let s = try ScratchVolume()
            try s.volume.close()
            // \u{1} and \u{2} stand for the bytes 0xff and 0xfe, which a Swift string cannot carry to debugfs.
            let raw = Array(command.utf8).map { $0 == 1 ? 0xff : $0 == 2 ? 0xfe : $0 }
            let script = s.dir.path + "/cmds"
            try Data(raw + [0x0a]).write(to: URL(fileURLWithPath: script))
            let made = try Oracle.run("/usr/sbin/debugfs", ["-w", "-f", script, s.image])
            #expect(made.status == 0, "\(made.stderr)")
            s.volume = try Volume(device: FileBlockDevice(path: FilePath(s.image)), readOnly: true, logger: quietLogger)
            let e = #expect(throws: LayerDiffer.Error.self) { _ = try diff(s, nil) }
            let message = e.map { "\($0)" } ?? ""
            #expect(message.contains("'\(path)'") && message.contains("not valid UTF-8"), "\(message)")
            try s.volume.close()
        }
    }
}
