using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using OffloadRpc;
using OffloadRpc.Benchmarks;
using OffloadRpc.Testing;
using OffloadRpc.Transport;

// Transport benchmark over two real processes, with the physical floors measured in the same run:
//   dotnet run -c Release --project tests/OffloadRpc.Benchmarks [-- --quick] [--json FILE]
// The per-call cost of the observed path (metadata, interceptors, telemetry) of a typed call:
//   dotnet run -c Release --project tests/OffloadRpc.Benchmarks -- --observed [--quick]
// The child modes (--serve, --serve-observed, --pingpong) are started by the benchmark itself.
if (args.Length >= 2 && args[0] == "--serve")
{
    return await TransportServer.RunAsync(args[1]);
}

if (args.Length >= 2 && args[0] == "--serve-observed")
{
    return await ObservedBenchmark.ServeAsync(args[1]);
}

if (args.Length >= 3 && args[0] == "--pingpong")
{
    return OffloadRpc.Cli.PingPong.RunPartner(int.Parse(args[1], CultureInfo.InvariantCulture), int.Parse(args[2], CultureInfo.InvariantCulture));
}

if (Environment.GetEnvironmentVariable(BenchmarkProcess.ChildVariable) is not null)
{
    Console.Error.WriteLine($"benchmark child started with unexpected arguments: {string.Join(' ', args)}");
    return 3; // never recurse into the main benchmark from a child
}

bool quick = args.Contains("--quick");
if (args.Contains("--observed"))
{
    return await ObservedBenchmark.RunAsync(quick);
}

string? json = args.SkipWhile(a => a != "--json").Skip(1).FirstOrDefault();
return await TransportBenchmark.RunAsync(quick, json);
