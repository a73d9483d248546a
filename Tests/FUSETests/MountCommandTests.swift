import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The built `thinfs` and `thinfs-mount` binaries, beside the test bundle.
enum Binaries {
    static func path(_ name: String) -> String {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [dir, dir.deletingLastPathComponent()] {
            let p = candidate.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return dir.appendingPathComponent(name).path
    }

    static var available: Bool {
        ["thinfs", "thinfs-mount"].allSatisfy { FileManager.default.isExecutableFile(atPath: path($0)) }
            && ["/sbin/mke2fs", "/usr/sbin/mke2fs"].contains { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Runs `name` with `args`, its environment ours with `environment` laid over it.
    static func run(_ name: String, _ args: [String], environment: [String: String] = [:]) throws -> Oracle.Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path(name))
        p.arguments = args
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Read to EOF: a daemon that kept our pipes open would hang here.
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Oracle.Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                             stderr: String(decoding: e, as: UTF8.self))
    }

    /// The pid of the thinfs-mount daemon serving `mountpoint`.
    static func daemon(serving mountpoint: String) -> pid_t? {
        let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        for entry in procs {
            guard let pid = pid_t(entry), let raw = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { continue }
            let args = raw.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
            if args.first?.hasSuffix("thinfs-mount") == true, args.contains(mountpoint), args.contains("-f") { return pid }
        }
        return nil
    }

    /// Gone, or a zombie nobody has reaped yet.
    static func exited(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
        return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
    }
}

/// `thinfs-mount` end to end: detaching, the ready handshake, SIGTERM, errors.
@Suite("thinfs-mount", .enabled(if: Host.canMountFUSE && Binaries.available, "needs /dev/fuse, root, mke2fs and the built binaries"))
struct MountCommandTests {
    @Test func detachesServesAndStopsCleanlyOnSIGTERM() throws {
        let dir = TempDir()
        let root = dir.path + "/root", mnt = dir.path + "/mnt"
        mkdir(mnt, 0o755)
        defer { if Host.isMounted(mnt) { umount2(mnt, Int32(MNT_DETACH)) } }
        #expect(try Binaries.run("thinfs", ["pool", "create", "--root", root, "--data-size", "1G", "--metadata-size", "16M"]).status == 0)
        #expect(try Binaries.run("thinfs", ["pool", "message", "--root", root, "create_thin", "1"]).status == 0)
        #expect(try Binaries.run("thinfs", ["pool", "message", "--root", root, "create_thin", "2"]).status == 0)
        #expect(try Binaries.run("thinfs", ["dev", "format", "--root", root, "1", "--size", "64M"]).status == 0)

        // Bad input: each a clear error, exit 1.
        let cases: [([String], String)] = [
            (["--root", root, "--device", "9", mnt], "does not exist"),          // no such thin device
            (["--root", root, "--device", "2", mnt], "holds no filesystem"),     // never formatted
            (["--root", dir.path + "/nopool", "--device", "1", mnt], "no thin pool"),
            (["--root", root, "--device", "1", dir.path], "is not empty"),       // the temp dir holds root/ and mnt/
            (["--root", root, "--device", "1", mnt, "-o", "nosuchoption"], "nosuchoption"),
        ]
        for (args, message) in cases {
            let r = try Binaries.run("thinfs-mount", args)
            #expect(r.status == 1 && r.stderr.contains(message), "\(args): \(r.stderr)")
        }
        #expect(!Host.isMounted(mnt))

        // Detaches once mounted; the parent's pipes are released (run() read them to EOF).
        let started = try Binaries.run("thinfs-mount", ["--root", root, "--device", "1", mnt])
        #expect(started.status == 0, "\(started.stderr)")
        #expect(Host.isMounted(mnt))
        let busy = try Binaries.run("thinfs-mount", ["--root", root, "--device", "1", mnt])
        #expect(busy.status == 1 && busy.stderr.contains("busy"), "\(busy.stderr)")

        let content = Array("written through FUSE, committed at SIGTERM".utf8)
        #expect(Sys.writeFile(mnt + "/hello", content) == 0)
        let pid = try #require(Binaries.daemon(serving: mnt))
        #expect(kill(pid, SIGTERM) == 0)
        #expect(eventually(10) { !Host.isMounted(mnt) && Binaries.exited(pid) }, "SIGTERM unmounts and the daemon exits")

        // The data survived the shutdown: mount again read-only and read it back.
        #expect(try Binaries.run("thinfs-mount", ["--root", root, "--device", "1", mnt, "-o", "ro"]).status == 0)
        #expect(Sys.readFile(mnt + "/hello") == content)
        #expect(LibC.check(unlink(mnt + "/hello")) == EROFS)
        let roPID = try #require(Binaries.daemon(serving: mnt))
        #expect(umount2(mnt, 0) == 0)
        #expect(eventually(10) { Binaries.exited(roPID) }, "umount ends the daemon")
    }
}
