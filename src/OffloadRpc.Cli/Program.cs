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
var clients = new Option<string?>("--clients") { Arity = ArgumentArity.ZeroOrOne, Description = "Instead: one server process and N client processes calling at once, a 64-byte and a 1 MiB call, per N of a list (1,2,4,8,16 when no list is given; 1 is always measured)." };
var idleClients = new Option<int?>("--idle-clients") { Description = "Also (or instead): the server's CPU time and threads while N connected clients are idle." };
var idleProcesses = new Option<int?>("--idle-processes") { Description = "Spread the idle connections over this many client processes (default: one process per connection)." };
var windowMs = new Option<int?>("--window-ms") { Description = "The measuring window of each --clients cell (default 2000 with --quick, else 5000), and of --idle-clients (default 5000)." };
var warmUpMs = new Option<int?>("--warmup-ms") { Description = "The warm-up of each --clients cell before its window (default 1000 with --quick, else 2000)." };
var bench = new Command("bench", "Start a server process and measure every transfer mode and cache policy per payload size, with the floors of the same run; or, with --clients / --idle-clients, many client processes against one server.");
bench.Options.Add(quick);
bench.Options.Add(json);
bench.Options.Add(plot);
foreach (Option option in new Option[] { clients, idleClients, idleProcesses, windowMs, warmUpMs })
{
    bench.Options.Add(option);
}

bench.SetAction((parse, _) =>
{
    if (parse.GetResult(clients) is null && parse.GetValue(idleClients) is null)
    {
        if (new Option[] { idleProcesses, windowMs, warmUpMs }.FirstOrDefault(o => parse.GetResult(o) is not null) is { } stray)
        {
            Console.Error.WriteLine($"{stray.Name} goes with --clients or --idle-clients");
            return Task.FromResult(2);
        }

        return Bench.RunAsync(parse.GetValue(quick), parse.GetValue(json), parse.GetValue(plot));
    }

    string? error = ClientsOptions.Parse(parse.GetResult(clients) is { } list ? parse.GetValue(clients) ?? string.Empty : null, parse.GetValue(idleClients), parse.GetValue(idleProcesses), parse.GetValue(windowMs), parse.GetValue(warmUpMs), parse.GetValue(quick), parse.GetValue(json), parse.GetValue(plot), out ClientsSettings? settings);
    if (error is not null)
    {
        Console.Error.WriteLine(error);
        return Task.FromResult(2);
    }

    return BenchClients.RunAsync(settings!);
});
root.Subcommands.Add(bench);

// The processes bench starts: not for people.
var endpointArgument = new Argument<string>("endpoint");
var benchServer = new Command("bench-server") { Hidden = true };
benchServer.Arguments.Add(endpointArgument);
benchServer.SetAction((parse, _) => Bench.ServeAsync(parse.GetValue(endpointArgument)!));
root.Subcommands.Add(benchServer);
var connections = new Option<int>("--connections") { DefaultValueFactory = _ => 1 };
var benchClient = new Command("bench-client") { Hidden = true };
benchClient.Arguments.Add(endpointArgument);
benchClient.Options.Add(connections);
benchClient.SetAction((parse, _) => BenchClients.ClientAsync(parse.GetValue(endpointArgument)!, parse.GetValue(connections)));
root.Subcommands.Add(benchClient);
var pid = new Argument<int>("pid");
var fd = new Argument<int>("fd");
var benchPingPong = new Command("bench-pingpong") { Hidden = true };
benchPingPong.Arguments.Add(pid);
benchPingPong.Arguments.Add(fd);
benchPingPong.SetAction(parse => PingPong.RunPartner(parse.GetValue(pid), parse.GetValue(fd)));
root.Subcommands.Add(benchPingPong);

return await root.Parse(args).InvokeAsync();
