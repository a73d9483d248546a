import Foundation
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// The pieces `thinfs serve` is built from that need no FUSE: the storage-option check against
/// a store's options, /proc/locks parsing, and the systemd notification.
struct ServeSupportTests {
    @Test func storedOptionsAcceptTheirOwnValuesAndNameTheKeyThatDiffers() throws {
        let stored = try StorageOptions(parsing: ["dm.basesize=256M", "dm.mkfsarg=-O^has_journal", "dm.use_deferred_deletion=true"])
        // The same values, spelled differently, change nothing.
        try stored.checkUnchanged(by: ["dm.basesize=262144K", "DM.use_deferred_deletion=yes", "dm.mkfsarg=-O^has_journal"], root: "/r")
        try stored.checkUnchanged(by: [], root: "/r")
        #expect(throws: StorageOptions.Error.self) { try stored.checkUnchanged(by: ["dm.basesize=128M"], root: "/r") }
        do {
            try stored.checkUnchanged(by: ["dm.basesize=256M", "dm.blocksize=128K"], root: "/r")
            Issue.record("a different dm.blocksize was accepted")
        } catch {
            #expect(error.option == "dm.blocksize")
            #expect(error.description.contains("/r") && error.description.contains("64K") && error.description.contains("128K"), "\(error)")
        }
        // A repeatable key compares as the whole list.
        #expect(throws: StorageOptions.Error.self) { try stored.checkUnchanged(by: ["dm.mkfsarg=-E lazy_itable_init=0"], root: "/r") }
        // Invalid options are refused as init refuses them.
        do {
            try stored.checkUnchanged(by: ["dm.nosuch=1"], root: "/r")
            Issue.record("an unknown key was accepted")
        } catch {
            #expect(error.option == "dm.nosuch")
        }
    }

    @Test func procLocksNamesTheFlockHolderOfAFile() {
        let text = """
            1: POSIX  ADVISORY  WRITE 900 08:01:77 0 EOF
            2: FLOCK  ADVISORY  WRITE 4711 fd:01:1835010 0 EOF
            2: -> FLOCK  ADVISORY  WRITE 4712 fd:01:1835010 0 EOF
            3: FLOCK  ADVISORY  READ 4713 fd:01:1835011 0 EOF
            4: FLOCK  ADVISORY  WRITE 4714 fe:01:1835010 0 EOF
            """
        #expect(LockHolders.parse(text, major: 0xfd, minor: 1, inode: 1835010) == [4711])
        #expect(LockHolders.parse(text, major: 0xfd, minor: 1, inode: 1835011) == [4713])
        #expect(LockHolders.parse(text, major: 8, minor: 1, inode: 77).isEmpty)   // POSIX, not flock
        // A line shown twice (the list grew at the head between two reads) is one holder.
        #expect(LockHolders.parse(text + "\n5: FLOCK  ADVISORY  READ 4713 fd:01:1835011 0 EOF", major: 0xfd, minor: 1, inode: 1835011) == [4713])
    }

    @Test func procLocksFindsOurOwnFlock() throws {
        let dir = TempDir()
        let path = dir.path + "/held"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        #expect(fd >= 0, "open \(path): errno \(errno)")
        defer { close(fd) }
        #expect(LockHolders.flockHolders(of: path).isEmpty)
        var st = stat()
        try #require(stat(path, &st) == 0)
        // The fallback alone: an open descriptor without a lock is not a holder.
        #expect(LockHolders.descriptorHolders(of: .init(st)).isEmpty)
        #expect(flock(fd, LOCK_EX) == 0)
        #expect(LockHolders.flockHolders(of: path) == [getpid()])
        #expect(LockHolders.descriptorHolders(of: .init(st)) == [getpid()])
    }

    /// Takes an exclusive flock on each of DIR/held-0 ... held-(count-1); returns their descriptors.
    /// Each /proc/locks line is about 50 bytes, so 300 locks span several pages.
    static func holdFlocks(in dir: String, count: Int) throws -> [Int32] {
        var fds: [Int32] = []
        do {
            for i in 0..<count {
                let fd = open(dir + "/held-\(i)", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
                try #require(fd >= 0, "open: errno \(errno)")
                fds.append(fd)
                try #require(flock(fd, LOCK_EX) == 0)
            }
        } catch {
            for fd in fds { close(fd) }
            throw error
        }
        return fds
    }

    /// /proc/locks is a seq_file like mountinfo: a lock listed after the first page must be found
    /// too (Foundation's String(contentsOfFile:) read one page of it).
    @Test func procLocksFindsAFlockPastTheFirstPage() throws {
        let dir = TempDir()
        let fds = try Self.holdFlocks(in: dir.path, count: 300)
        defer { for fd in fds { close(fd) } }
        let missing = (0..<300).filter { LockHolders.flockHolders(of: dir.path + "/held-\($0)") != [getpid()] }
        #expect(missing.isEmpty, "\(missing.count) of our 300 flocks not found in /proc/locks")
    }

    /// /proc/locks is no snapshot: it is read a page per read(2), and a lock taken or released
    /// elsewhere between two reads shifts the list, so a line can be skipped. CI's parallel tests
    /// take and drop flocks all the time; there the test above missed one of its 300 locks.
    /// Here two threads churn flocks on other files while every held lock is looked up.
    @Test func procLocksFindsAFlockWhileOtherLocksComeAndGo() throws {
        let dir = TempDir()
        let fds = try Self.holdFlocks(in: dir.path, count: 300)
        defer { for fd in fds { close(fd) } }
        let stop = StopFlag()
        let churners = (0..<2).map { k in
            let path = dir.path + "/churn-\(k)"
            let thread = Thread {
                while !stop.isSet {
                    let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
                    if fd >= 0 {
                        _ = flock(fd, LOCK_EX)
                        close(fd)
                    }
                }
                stop.finished()
            }
            thread.start()
            return thread
        }
        defer { stop.set(waitingFor: churners.count) }
        var wrong: [String] = []
        for _ in 0..<3 {
            for i in 0..<300 {
                let holders = LockHolders.flockHolders(of: dir.path + "/held-\(i)")
                if holders != [getpid()] { wrong.append("held-\(i): \(holders)") }
            }
        }
        #expect(wrong.isEmpty, "\(wrong.count) of 900 lookups of our flocks went wrong while other locks changed: \(wrong.prefix(5))")
    }

    /// A stop flag for the churn threads, and a count of those that saw it.
    final class StopFlag: @unchecked Sendable {
        private let condition = NSCondition()
        private var stopped = false
        private var done = 0
        var isSet: Bool { condition.lock(); defer { condition.unlock() }; return stopped }
        func finished() { condition.lock(); done += 1; condition.broadcast(); condition.unlock() }
        func set(waitingFor count: Int) {
            condition.lock()
            stopped = true
            while done < count { condition.wait() }
            condition.unlock()
        }
    }

    @Test(arguments: [false, true]) func notifySendsTheStateToNotifySocket(abstract: Bool) throws {
        let name = "thinfs-notify-test-\(UUID().uuidString.prefix(8))"
        let path = abstract ? "@" + name : "/tmp/" + name + ".sock"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        defer {
            close(fd)
            if !abstract { unlink(path) }
        }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = abstract ? [0] + Array(name.utf8) : Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let length = MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + bytes.count + (abstract ? 0 : 1)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(length)) }
        }
        try #require(rc == 0, "bind: errno \(errno)")

        #expect(SystemdNotify.send("READY=1", environment: [:]) == nil)
        #expect(SystemdNotify.send("READY=1\nSTATUS=x", environment: ["NOTIFY_SOCKET": path]) == true)
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        try #require(n > 0)
        #expect(String(decoding: buffer[0..<n], as: UTF8.self) == "READY=1\nSTATUS=x")
    }
}
