using System.CommandLine;
using OffloadRpc.Cli;

// offloadrpc: tools for the machine OffloadRpc runs on. `doctor` checks that every mechanism the
// transport needs works here and reports the hardware facts the transfer modes depend on.
var root = new RootCommand("OffloadRpc tools: check this machine for shared-memory IPC and offload engines.");

var asJson = new Option<bool>("--json") { Description = "Print the findings as JSON instead of a table." };
var doctor = new Command("doctor", "Check memfd sealing, futex, descriptor passing and a loopback connection; report CPU features, cache, /dev/shm and limits.");
doctor.Options.Add(asJson);
doctor.SetAction(parse => Doctor.Run(parse.GetValue(asJson)));
root.Subcommands.Add(doctor);

var quick = new Option<bool>("--quick") { Description = "Fewer repetitions: a rougher measurement in a few seconds." };
var calibrate = new Command("calibrate", "Measure each copy engine, mode and cache policy per size on this machine; store the result for the Auto policy and print it.");
calibrate.Options.Add(quick);
calibrate.SetAction(parse => Calibrate.Run(parse.GetValue(quick)));
root.Subcommands.Add(calibrate);

var json = new Option<string?>("--json") { Description = "Write the rows as a JSON array to this file." };
var plot = new Option<string?>("--plot") { Description = "Draw GB/s against payload size per mode into this PNG file." };
var bench = new Command("bench", "Start a server process and measure every transfer mode and cache policy per payload size, with the floors of the same run.");
bench.Options.Add(quick);
bench.Options.Add(json);
bench.Options.Add(plot);
bench.SetAction((parse, _) => Bench.RunAsync(parse.GetValue(quick), parse.GetValue(json), parse.GetValue(plot)));
root.Subcommands.Add(bench);

// The processes bench starts: not for people.
var endpointArgument = new Argument<string>("endpoint");
var benchServer = new Command("bench-server") { Hidden = true };
benchServer.Arguments.Add(endpointArgument);
benchServer.SetAction((parse, _) => Bench.ServeAsync(parse.GetValue(endpointArgument)!));
root.Subcommands.Add(benchServer);
var pid = new Argument<int>("pid");
var fd = new Argument<int>("fd");
var benchPingPong = new Command("bench-pingpong") { Hidden = true };
benchPingPong.Arguments.Add(pid);
benchPingPong.Arguments.Add(fd);
benchPingPong.SetAction(parse => PingPong.RunPartner(parse.GetValue(pid), parse.GetValue(fd)));
root.Subcommands.Add(benchPingPong);

return await root.Parse(args).InvokeAsync();
