import Foundation
import TestSupport
import Testing

/// The `thinfs` binary, built beside the test bundle.
enum CLI {
    static var binary: String {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        // swift test runs .build/<config>/<Package>PackageTests.xctest; the products sit beside it.
        for candidate in [dir, dir.deletingLastPathComponent()] {
            let p = candidate.appendingPathComponent("thinfs").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return dir.appendingPathComponent("thinfs").path
    }

    static var available: Bool { FileManager.default.isExecutableFile(atPath: binary) }

    @discardableResult
    static func run(_ args: [String], stdin: Data? = nil, environment: [String: String] = [:]) throws -> Oracle.Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        if !environment.isEmpty {
            p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let out = Pipe(), err = Pipe(), input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(stdin) }
        try input.fileHandleForWriting.close()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Oracle.Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                             stderr: String(decoding: e, as: UTF8.self))
    }

    static func runBytes(_ args: [String]) throws -> Data {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return o
    }
}

@Suite("thinfs CLI", .enabled(if: CLI.available, "the thinfs binary is not built"))
struct CLITests {
    func sha(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    @Test(.enabled(if: Oracle.available)) func snapshotRoundTripThroughTheCLI() throws {
        let dir = TempDir()
        let root = ["--root", dir.path]
        #expect(try CLI.run(["pool", "create"] + root + ["--data-size", "1G", "--metadata-size", "16M"]).status == 0)
        #expect(try CLI.run(["pool", "message"] + root + ["create_thin", "1"]).status == 0)
        let original = Data((0..<300_000).map { UInt8(truncatingIfNeeded: $0 * 7 + $0 / 251) })
        #expect(try CLI.run(["dev", "write"] + root + ["1"], stdin: original).status == 0)
        #expect(try CLI.run(["pool", "message"] + root + ["create_snap 2 1"]).status == 0)
        #expect(try CLI.run(["dev", "write"] + root + ["1", "--offset", "1000"], stdin: Data("changed".utf8)).status == 0)
        let snap = try CLI.runBytes(["dev", "read"] + root + ["2", "--length", "300000"])
        #expect(snap == original)
        let origin = try CLI.runBytes(["dev", "read"] + root + ["1", "--offset", "1000", "--length", "7"])
        #expect(String(decoding: origin, as: UTF8.self) == "changed")
        let status = try CLI.run(["pool", "status"] + root)
        let fields = status.stdout.split(separator: " ")
        // <tid> <meta used/total> <data used/total> <held> <mode> <discard> <no space> <needs_check> <low water mark>
        #expect(fields.count == 9, "\(status.stdout)")
        #expect(fields[0] == "0" && fields[2] == "6/16384" && fields[3] == "-" && fields[4] == "rw")
        #expect(try CLI.run(["dev", "status"] + root + ["2"]).stdout == "640 639\n")
        let dump = try CLI.run(["pool", "dump"] + root)
        #expect(dump.stdout == (try Oracle.dump(dir.path + "/pool/metadata")))
        try Oracle.check(dir.path + "/pool/metadata")
    }

    /// Each case: arguments after `thinfs`, and a fragment the one-line error must contain.
    @Test(arguments: [
        (["pool", "status"], "no thin pool at"),
        (["dev", "read", "1"], "no thin pool at"),
        (["pool", "message", "create_thin", "1"], "no thin pool at"),
    ])
    func missingPool(args: [String], fragment: String) throws {
        let dir = TempDir()
        let r = try CLI.run(args + ["--root", dir.path + "/nothing"])
        #expect(r.status != 0)
        #expect(r.stderr.contains(fragment), "\(r.stderr)")
    }

    @Test func refusedCommandsChangeNothing() throws {
        let dir = TempDir()
        let root = ["--root", dir.path]
        #expect(try CLI.run(["pool", "create"] + root + ["--data-size", "1G", "--metadata-size", "16M"]).status == 0)
        #expect(try CLI.run(["pool", "message"] + root + ["create_thin", "1"]).status == 0)
        let meta = dir.path + "/pool/metadata"
        let before = try sha(meta)
        // Each: arguments, and what the error must name.
        let cases: [([String], String)] = [
            (["dev", "read", "7"], "thin device 7 does not exist"),
            (["dev", "write", "7"], "thin device 7 does not exist"),
            (["pool", "message", "create_thin 1"], "thin device 1 already exists"),
            (["pool", "message", "create_snap 3 9"], "origin thin device 9 does not exist"),
            (["pool", "message", "delete x"], "'x' is not a decimal number"),
            (["pool", "message", "set_transaction_id 4 5"], "transaction id mismatch"),
            (["pool", "resize", "--data-size", "512M"], "cannot shrink"),
            (["pool", "resize", "--data-size", "1000001K"], "not a multiple of the block size"),
            (["pool", "create", "--data-size", "1G"], "already has a pool"),
        ]
        for (args, fragment) in cases {
            let r = try CLI.run(args + root, stdin: Data("x".utf8))
            #expect(r.status != 0, "\(args) succeeded")
            #expect(r.stderr.contains(fragment), "\(args): \(r.stderr)")
        }
        #expect(try sha(meta) == before, "a refused command changed the metadata")
    }

    @Test func badSizesAreRejected() throws {
        let dir = TempDir()
        for (args, fragment) in [(["--data-size", "12Q"], "data-size"), (["--block-size", "100K"], "block size 100K is invalid")] {
            let r = try CLI.run(["pool", "create", "--root", dir.path] + args)
            #expect(r.status != 0)
            #expect(r.stderr.contains(fragment), "\(r.stderr)")
        }
    }

    /// An explicit `--data`/`--metadata` whose directory does not exist is a typo, not a request
    /// for a directory tree: the error names the missing directory and nothing is made, neither
    /// that directory nor the root. (It used to `mkdir -p` the path.)
    @Test func poolCreateOnAMissingDirectoryNamesItAndMakesNothing() throws {
        let dir = TempDir()
        for flag in ["--data", "--metadata"] {
            let missing = dir.path + "/nonexistent/sub"
            let r = try CLI.run(["pool", "create", "--root", dir.path + "/store", flag, missing + "/file",
                                 "--data-size", "1G", "--metadata-size", "16M"])
            #expect(r.status != 0, "\(flag) into a missing directory succeeded")
            #expect(r.stderr.contains("\(missing): no such directory"), "\(flag): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.path + "/nonexistent"), "\(flag): the directory was made")
            #expect(!FileManager.default.fileExists(atPath: dir.path + "/store"), "\(flag): the root was made")
        }
        // Under the root is ours to make, as the VM suite's userspace-to-kernel does.
        let inside = try CLI.run(["pool", "create", "--root", dir.path + "/r", "--data", dir.path + "/r/d/data",
                                  "--metadata", dir.path + "/r/meta", "--data-size", "1G", "--metadata-size", "16M"])
        #expect(inside.status == 0, "paths under a root that does not exist yet: \(inside.stderr)")
    }

    /// `thinfs umount` of something that is not a mount names it and touches no store.
    @Test(.enabled(if: CLI.available)) func umountOfANonMountSaysSo() throws {
        let dir = TempDir()
        let plain = try CLI.run(["umount", "--root", dir.path + "/store", dir.path])
        #expect(plain.status != 0 && plain.stderr.contains("\(dir.path) is not a mount point"), "\(plain.stderr)")
        let missing = try CLI.run(["umount", dir.path + "/nothing"])
        #expect(missing.status != 0 && missing.stderr.contains("\(dir.path)/nothing: No such file or directory"), "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/store"))
    }

    /// SIGKILL a writer part way through a stream: after reopening, the device
    /// holds exactly its last committed bytes (the atomic-commit policy), and
    /// the metadata passes thin_check.
    @Test(.enabled(if: Oracle.available)) func sigkillDuringWritesKeepsTheLastCommit() throws {
        let dir = TempDir()
        let root = ["--root", dir.path]
        #expect(try CLI.run(["pool", "create"] + root + ["--data-size", "4G", "--metadata-size", "32M"]).status == 0)
        #expect(try CLI.run(["pool", "message"] + root + ["create_thin", "1"]).status == 0)
        let committed = Data((0..<(8 << 20)).map { UInt8(truncatingIfNeeded: $0 >> 9) })
        #expect(try CLI.run(["dev", "write"] + root + ["1"], stdin: committed).status == 0)

        // Stream overwrites into the committed blocks and past them, then kill.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: CLI.binary)
        p.arguments = ["dev", "write"] + root + ["1"]
        let input = Pipe()
        p.standardInput = input
        try p.run()
        let junk = Data(repeating: 0xFF, count: 1 << 20)
        for _ in 0..<24 { input.fileHandleForWriting.write(junk) }   // 24 MiB: it has written into pool blocks by now
        Thread.sleep(forTimeInterval: 0.2)
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        try? input.fileHandleForWriting.close()
        #expect(p.terminationReason == .uncaughtSignal)

        try Oracle.check(dir.path + "/pool/metadata")
        let back = try CLI.runBytes(["dev", "read"] + root + ["1", "--length", "\(8 << 20)"])
        #expect(back == committed)
        #expect(try CLI.run(["dev", "status"] + root + ["1"]).stdout == "\((8 << 20) / 512) \((8 << 20) / 512 - 1)\n")
    }
}

@Suite("thinfs CLI: adopting, restoring and checking pools",
       .enabled(if: CLI.available && Oracle.available, "needs the thinfs binary and thin-provisioning-tools"))
struct CLIPoolFileTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("PersistentDataTests/Fixtures")

    /// A pool made by thin_restore is adopted without a byte changing, and its devices read back.
    @Test func openAdoptsAThinRestorePoolUnchanged() throws {
        let dir = TempDir()
        let xml = try String(contentsOf: Self.fixtures.appendingPathComponent("basic.xml"), encoding: .utf8)
        let meta = dir.file("meta", size: 8 << 20)
        try Oracle.restore(xml: xml, to: meta)
        let nrData = UInt64(xml.firstMatch(of: /nr_data_blocks="(\d+)"/)!.1)!
        let blockSectors = UInt64(xml.firstMatch(of: /data_block_size="(\d+)"/)!.1)!
        let data = dir.file("data", size: nrData * blockSectors * 512)
        let before = try Data(contentsOf: URL(fileURLWithPath: meta))
        let r = try CLI.run(["pool", "open", "--root", dir.path + "/root", "--data", data, "--metadata", meta])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try CLI.run(["pool", "status", "--root", dir.path + "/root"]).status == 0)
        #expect(try CLI.run(["pool", "dump", "--root", dir.path + "/root"]).stdout == xml)
        #expect(try CLI.run(["pool", "check", "--root", dir.path + "/root"]).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: meta)) == before, "adopting changed the metadata")
    }

    @Test func restoreThenCheckAgreesWithThinCheck() throws {
        let dir = TempDir()
        let root = ["--root", dir.path]
        #expect(try CLI.run(["pool", "create"] + root + ["--data-size", "1G", "--metadata-size", "8M"]).status == 0)
        let fixture = Self.fixtures.appendingPathComponent("snapshot-chain.xml")
        let xml = try String(contentsOf: fixture, encoding: .utf8)
        // 20000 blocks of 64K do not fit the 1G data file: refused, naming the remedy.
        let small = try CLI.run(["pool", "restore"] + root + [fixture.path])
        #expect(small.status != 0 && small.stderr.contains("grow it first"), "\(small.stderr)")
        #expect(try CLI.run(["pool", "resize"] + root + ["--data-size", "2G"]).status == 0)
        #expect(try CLI.run(["pool", "restore"] + root + [fixture.path]).status == 0)
        let meta = dir.path + "/pool/metadata"
        #expect(try Oracle.dump(meta) == xml)
        // Restoring over devices needs --force.
        let refused = try CLI.run(["pool", "restore"] + root + [fixture.path])
        #expect(refused.status != 0 && refused.stderr.contains("--force"))
        let clean = try CLI.run(["pool", "check"] + root)
        #expect(clean.status == 0 && clean.stdout.contains("metadata is consistent"), "\(clean.stdout)")

        // Damage the device-details root block: both checkers must object, and ours names the block.
        let sb = try Data(contentsOf: URL(fileURLWithPath: meta))
        let detailsRoot = sb[328..<336].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
        let h = FileHandle(forUpdatingAtPath: meta)!
        try h.seek(toOffset: detailsRoot * 4096 + 100)
        h.write(Data([0xFF, 0xEE]))
        try h.close()
        let ours = try CLI.run(["pool", "check"] + root)
        #expect(ours.status != 0)
        #expect((ours.stdout + ours.stderr).contains("\(detailsRoot)"), "\(ours.stdout)\(ours.stderr)")
        #expect(try Oracle.run("thin_check", [meta]).status != 0)
    }
}
