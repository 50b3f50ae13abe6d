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

var quick = new Option<bool>("--quick") { Description = "Fewer repetitions: a rougher measurement in a few seconds." };
var calibrate = new Command("calibrate", "Measure each copy engine, mode and cache policy per size on this machine; store the result for the Auto policy and print it.");
calibrate.Options.Add(quick);
calibrate.SetAction(parse => Calibrate.Run(parse.GetValue(quick)));
root.Subcommands.Add(calibrate);

return root.Parse(args).Invoke();
