using System.CommandLine;
using OffloadRpc.Cli;

// offloadrpc: tools for the machine OffloadRpc runs on. `doctor` checks that every mechanism the
// transport needs works here and reports the hardware facts the transfer modes depend on.
var root = new RootCommand("OffloadRpc tools: check this machine for shared-memory IPC and offload engines.");

var json = new Option<bool>("--json") { Description = "Print the findings as JSON instead of a table." };
var doctor = new Command("doctor", "Check memfd sealing, futex, descriptor passing and a loopback connection; report CPU features, cache, /dev/shm and limits.");
doctor.Options.Add(json);
doctor.SetAction(parse => Doctor.Run(parse.GetValue(json)));
root.Subcommands.Add(doctor);

return root.Parse(args).Invoke();
