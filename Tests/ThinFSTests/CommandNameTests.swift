import ArgumentParser
import Testing
@testable import ThinFSCommands

/// Every command names itself. Without `commandName`, ArgumentParser derives the name with
/// `String(describing: Self.self)`, whose casts scan every protocol conformance record in the
/// binary once per command type: building the command tree that way was 40% of the
/// instructions of every `thinfs` process (callgrind of `thinfs --version`, session 9).
@Suite("thinfs command names")
struct CommandNameTests {
    static func walk(_ command: any ParsableCommand.Type, path: String, into unnamed: inout [String]) {
        let configuration = command.configuration
        let here = path + " " + (configuration.commandName ?? "<\(command)>")
        if configuration.commandName == nil { unnamed.append(here) }
        for sub in configuration.subcommands { walk(sub, path: here, into: &unnamed) }
    }

    @Test func everyCommandHasAnExplicitName() {
        var unnamed: [String] = []
        Self.walk(ThinFSCommand.self, path: "", into: &unnamed)
        Self.walk(ThinFSMountCommand.self, path: "", into: &unnamed)
        #expect(unnamed.isEmpty, "commands without commandName: \(unnamed)")
    }
}
