import ThinFSCommands

ThinFSCommand.main()
