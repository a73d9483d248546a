import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Detaching `thinfs-mount` without fork(2).
///
/// A Swift process has threads from its first moments (the runtime, dispatch), and a forked
/// copy of a multithreaded process may only call async-signal-safe functions. So the
/// parent starts a fresh copy of itself, `/proc/self/exe ARGS -f`, with the write end of a
/// pipe in `THINFS_READY_FD`, and waits:
///
///     parent                                  daemon (-f, THINFS_READY_FD=N)
///     pipe, posix_spawn ───────────────────▶  setsid, open pool, volume, mount
///     read(pipe) ◀──────────── "R" ─────────  mounted: stdio to /dev/null, serve
///        exit 0
///     read(pipe) ◀── "E" message, EOF ──────  failed: exit 1
///        print message, exit 1
///     read(pipe) ◀──────────── EOF ─────────  died: parent reports its exit status
enum MountDaemon {
    static let readyVariable = "THINFS_READY_FD"
    static let readyByte = UInt8(ascii: "R")
    static let failureByte = UInt8(ascii: "E")

    /// Starts the daemon and waits for its verdict; returns the `ExitCode` to leave with.
    /// `name` in the directory of the running executable (`thinfs` starts `thinfs-mount`).
    static func siblingExecutable(_ name: String) -> String {
        let me = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return me.deletingLastPathComponent().appendingPathComponent(name).path
    }

    static func detach(arguments: [String], executable: String = "/proc/self/exe") -> ExitCode {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { return report("cannot create a pipe: \(describe(errno))") }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        // Only the write end crosses into the daemon.
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        // Nothing else we hold may outlive us in the daemon. A caller's descriptors (Foundation's
        // Process watches a socket to see its child exit; a shell's pipes) would stay open as long
        // as the mount, and the caller would wait on them.
        for fd in inheritedDescriptors() where fd > 2 && fd != writeEnd {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
        var environment = ProcessInfo.processInfo.environment
        environment[readyVariable] = String(writeEnd)
        var pid: pid_t = 0
        let rc = withCStrings(["thinfs-mount"] + arguments) { argv in
            withCStrings(environment.map { "\($0.key)=\($0.value)" }) { envp in
                posix_spawn(&pid, executable, &actions, nil, argv, envp)
            }
        }
        close(writeEnd)
        guard rc == 0 else {
            close(readEnd)
            return report("cannot start the daemon (\(executable)): \(describe(rc))")
        }

        var verdict: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(readEnd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            verdict += chunk[0..<n]
            if verdict.first == readyByte { break }
        }
        close(readEnd)
        if verdict.first == readyByte { return .success }

        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // wait(2)'s status word: the low 7 bits are the killing signal, bits 8-15 the exit code.
        let signal = status & 0x7f, code = (status >> 8) & 0xff
        if verdict.first == failureByte {
            return report(String(decoding: verdict.dropFirst(), as: UTF8.self), code: code == 0 ? 1 : code)
        }
        let how = signal != 0 ? "was killed by signal \(signal)" : "exited with status \(code)"
        return report("the daemon \(how) before the mount was ready; run with -f to see why", code: code == 0 ? 1 : code)
    }

    /// Our open descriptors, from /proc/self/fd (one of them is the listing's own, closed by then).
    private static func inheritedDescriptors() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
    }

    /// Shows a mount's warnings (`MountAccess`) to whoever mounted. The daemon calls this before
    /// it reports ready, while its stderr is still the caller's.
    static func warn(_ warnings: [String]) {
        for w in warnings { FileHandle.standardError.write(Data("warning: \(w)\n".utf8)) }
    }

    private static func report(_ message: String, code: Int32 = 1) -> ExitCode {
        FileHandle.standardError.write(Data("Error: \(message)\n".utf8))
        return ExitCode(code)
    }

    /// Runs `body` with a NULL-terminated C array of copies of `strings`.
    private static func withCStrings<T>(_ strings: [String], _ body: ([UnsafeMutablePointer<CChar>?]) -> T) -> T {
        let pointers = strings.map { strdup($0) } + [nil]
        defer { pointers.forEach { free($0) } }
        return body(pointers)
    }

    /// The daemon's end of the pipe.
    final class ReadyChannel {
        private var fd: Int32?

        private init(fd: Int32) { self.fd = fd }

        /// The channel the parent passed, if this process is a daemon being started.
        static func fromEnvironment() -> ReadyChannel? {
            guard let value = getenv(readyVariable), let fd = Int32(String(cString: value)), fd > 2,
                  fcntl(fd, F_GETFD) >= 0 else { return nil }
            unsetenv(readyVariable)
            // Children of the daemon (fusermount3) must not hold the parent's pipe open.
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return ReadyChannel(fd: fd)
        }

        /// The mount is up: let the parent exit 0, and let go of its terminal.
        func succeed() {
            send([readyByte])
            // As fuse_daemonize does: a daemon must not hold the caller's terminal or pipes (a caller
            // reading our stderr to EOF would wait for the unmount).
            let null = open("/dev/null", O_RDWR)
            if null >= 0 {
                for target in [Int32(0), 1, 2] { dup2(null, target) }
                if null > 2 { close(null) }
            }
            // Nor keep the caller's working directory busy; everything is open by now.
            _ = chdir("/")
        }

        /// Starting failed: the parent prints `message` and exits non-zero.
        func fail(_ message: String) {
            send([failureByte] + Array(message.utf8))
        }

        private func send(_ bytes: [UInt8]) {
            guard let fd else { return }
            self.fd = nil
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                done += n
            }
            close(fd)
        }
    }
}

/// strerror(3)'s text for an errno value.
private func describe(_ code: Int32) -> String { String(cString: strerror(code)) }
