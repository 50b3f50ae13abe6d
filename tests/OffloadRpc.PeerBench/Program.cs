using System.Globalization;
using System.Runtime.InteropServices;
using OffloadRpc;
using OffloadRpc.Cli;
using OffloadRpc.PeerBench;
using Spectre.Console;

// The peer benchmark (--streams: frame streams and the pipelined checksum, see StreamBench):
//   dotnet run -c Release --project tests/OffloadRpc.PeerBench -- [--quick] [--json FILE] [--plot FILE.png]
// With no role argument this is the client: it starts one server process per system, checks every
// system's results against a local reference, then measures. --serve and --pingpong-partner are the
// roles of the processes it starts.
if (Environment.GetEnvironmentVariable(ServerProcess.RoleVariable) is not null)
{
    switch (args)
    {
        case ["--serve", string kind, string endpoint]:
            return await Servers.RunAsync(kind, endpoint);
        case ["--client", string system, string endpoint, string sizes]:
            return await ClientSweep.RunClientAsync(system, endpoint, sizes);
        case ["--pingpong-partner", string pid, string fd]:
            return PingPong.RunPartner(int.Parse(pid, CultureInfo.InvariantCulture), int.Parse(fd, CultureInfo.InvariantCulture));
        default:
            Console.Error.WriteLine($"Started as a child ({ServerProcess.RoleVariable} is set) with unexpected arguments: {string.Join(' ', args)}");
            return 2;
    }
}

const string Usage = "usage: OffloadRpc.PeerBench [--quick] [--json FILE] [--plot FILE.png] [--systems a,b,...] [--sizes 64,1048576,...] [--cell-ms N] [--spin-us N]\n"
    + "       OffloadRpc.PeerBench --streams [--checksums] [--quick] [--window-ms N] [--json FILE]\n"
    + "       OffloadRpc.PeerBench --clients [1,2,4,8,16] [--quick] [--json FILE] [--systems a,b,...] [--sizes 1048576,...] [--window-ms N] [--warmup-ms N] [--spin-us N]\n"
    + "       OffloadRpc.PeerBench --pairs [SECONDS] [--in-process]   (grpc-uds and offloadrpc-grpc at 64 B in alternating blocks, SECONDS per operation, default 10;\n"
    + "                                                               --in-process: both served in this process over ASP.NET Core's TestServer)";
if (args is ["--pairs", .. string[] pairArgs])
{
    bool inProcess = pairArgs.Contains("--in-process");
    pairArgs = [.. pairArgs.Where(a => a != "--in-process")];
    if (pairArgs is not ([] or [_]) || (pairArgs is [string given] && !(int.TryParse(given, NumberStyles.None, CultureInfo.InvariantCulture, out int s) && s is >= 1 and <= 600)))
    {
        Console.Error.WriteLine($"--pairs takes at most one number of seconds per operation, 1 to 600, and --in-process; {Usage}");
        return 2;
    }

    TimeSpan perOperation = TimeSpan.FromSeconds(pairArgs is [string seconds] ? int.Parse(seconds, CultureInfo.InvariantCulture) : 10);
    return inProcess ? await InProcessPairs.RunAsync(perOperation) : await PairBench.RunAsync(perOperation);
}

Settings settings = args.Contains("--quick") ? Settings.QuickRun : Settings.Full; // first, so that options given before it still apply
string? json = null;
string? plot = null;
int[]? clients = null; // --clients: N client processes per system against one server per system
bool systemsGiven = false;
bool sizesGiven = false;
int? windowMs = null;
int? warmUpMs = null;
bool streams = false; // --streams: frame streams and the pipelined checksum (StreamBench)
bool checksumsOnly = false; // --checksums: of --streams, only the 64 MiB checksums
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--quick":
            break;
        case "--streams":
            streams = true;
            break;
        case "--checksums":
            streams = true;
            checksumsOnly = true;
            break;
        case "--clients":
            clients = SweepSettings.DefaultClients;
            if (i + 1 < args.Length && !args[i + 1].StartsWith("--", StringComparison.Ordinal))
            {
                clients = args[++i].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(n => int.TryParse(n, NumberStyles.None, CultureInfo.InvariantCulture, out int v) ? v : -1).ToArray();
                if (clients.Length == 0 || clients.Any(n => n is < 1 or > 256))
                {
                    Console.Error.WriteLine("--clients takes a comma-separated list of client counts from 1 to 256 (e.g. 1,2,4,8,16), or nothing for that list");
                    return 2;
                }
            }

            break;
        case "--window-ms" or "--warmup-ms":
            bool isWindow = args[i] == "--window-ms";
            if (i + 1 >= args.Length || !int.TryParse(args[i + 1], NumberStyles.None, CultureInfo.InvariantCulture, out int ms) || (isWindow && ms < 100))
            {
                Console.Error.WriteLine($"{args[i]} takes a whole number of milliseconds{(isWindow ? ", at least 100" : string.Empty)}; {Usage}");
                return 2;
            }

            i++;
            if (isWindow)
            {
                windowMs = ms;
            }
            else
            {
                warmUpMs = ms;
            }

            break;
        case "--json" when i + 1 < args.Length:
            json = args[++i];
            break;
        case "--plot" when i + 1 < args.Length:
            plot = args[++i];
            break;
        case "--systems" when i + 1 < args.Length:
            string[] systems = args[++i].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            if (systems.FirstOrDefault(s => !Settings.AllSystems.Contains(s)) is { } unknown)
            {
                Console.Error.WriteLine($"unknown system '{unknown}'; the systems are {string.Join(", ", Settings.AllSystems)}");
                return 2;
            }

            settings = settings with { Systems = systems };
            systemsGiven = true;
            break;
        case "--sizes" when i + 1 < args.Length:
            long[] sizes = args[++i].Split(',', StringSplitOptions.RemoveEmptyEntries).Select(s => long.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out long n) ? n : -1).ToArray();
            if (sizes.Length == 0 || sizes.Any(n => n is < 1 or > 1L << 30))
            {
                Console.Error.WriteLine("--sizes takes a comma-separated list of byte counts from 1 to 1073741824");
                return 2;
            }

            settings = settings with { Sizes = sizes };
            sizesGiven = true;
            break;
        case "--cell-ms" or "--spin-us":
            bool cell = args[i] == "--cell-ms";
            if (i + 1 >= args.Length || !int.TryParse(args[i + 1], NumberStyles.None, CultureInfo.InvariantCulture, out int number) || (cell && number == 0))
            {
                Console.Error.WriteLine($"{args[i]} takes a whole number {(cell ? "of milliseconds above 0" : "of microseconds (0: never spin)")}; {Usage}");
                return 2;
            }

            i++;
            settings = cell
                ? settings with { Cell = TimeSpan.FromMilliseconds(number), CellWarmup = TimeSpan.FromMilliseconds(number / 5.0), SystemWarmup = TimeSpan.FromMilliseconds(number * 2) }
                : settings with { SpinBudget = TimeSpan.FromMicroseconds(number) };
            break;
        case "-h" or "--help":
            Console.WriteLine(Usage);
            return 0;
        default:
            Console.Error.WriteLine($"unknown or incomplete argument '{args[i]}'; {Usage}");
            return 2;
    }
}

// Output files are checked before a run of minutes, not after it.
foreach (string? output in new[] { json, plot })
{
    if (output is not null && Path.GetDirectoryName(Path.GetFullPath(output)) is { } directory && !Directory.Exists(directory))
    {
        Console.Error.WriteLine($"the directory of '{output}' ({directory}) does not exist");
        return 2;
    }
}

if (Console.IsOutputRedirected && AnsiConsole.Profile.Width < (clients is null ? 160 : 220))
{
    AnsiConsole.Profile.Width = clients is null ? 160 : 220; // a log file has no terminal width: one line per row
}

if (streams)
{
    return await StreamBench.RunAsync(TimeSpan.FromMilliseconds(windowMs ?? (settings.Quick ? 1000 : 3000)), json, checksumsOnly);
}

if (clients is not null)
{
    string[] systems = systemsGiven ? settings.Systems : SweepSettings.SweepSystems;
    if (systems.FirstOrDefault(s => !SweepSettings.SweepSystems.Contains(s)) is { } other)
    {
        Console.Error.WriteLine($"--clients measures {string.Join(", ", SweepSettings.SweepSystems)}; not '{other}'");
        return 2;
    }

    if (plot is not null)
    {
        Console.Error.WriteLine("--plot draws the one-client run; with --clients write --json instead");
        return 2;
    }

    var sweepSettings = new SweepSettings(
        clients,
        systems,
        sizesGiven ? settings.Sizes : [1 << 20],
        TimeSpan.FromMilliseconds(warmUpMs ?? (settings.Quick ? 1000 : 2000)),
        TimeSpan.FromMilliseconds(windowMs ?? (settings.Quick ? 2000 : 5000)),
        settings.SpinBudget);
    return await SweepAsync(sweepSettings, json);
}

if (windowMs is not null || warmUpMs is not null)
{
    Console.Error.WriteLine("--window-ms and --warmup-ms go with --clients (the one-client run takes --cell-ms)");
    return 2;
}

AnsiConsole.MarkupLine($"[bold]OffloadRpc peer benchmark[/] ({(settings.Quick ? "quick" : "full")} run): {Markup.Escape(Runner.Describe(settings))}");
var clock = System.Diagnostics.Stopwatch.StartNew();
List<ResultRow> rows;
try
{
    await using var runner = new Runner(settings);
    // Ctrl+C or SIGTERM: the servers and the socket directory go with us (the default action then ends the process).
    using PosixSignalRegistration interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, _ => runner.Abort("interrupted"));
    using PosixSignalRegistration terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, _ => runner.Abort("terminated"));
    rows = await runner.RunAsync();
}
catch (Exception ex)
{
    AnsiConsole.MarkupLine($"[red]FAILED[/] {Markup.Escape(ex.GetType().Name)}: {Markup.Escape(ex.Message)}");
    if (ex is not (OffloadRpcException or TimeoutException or InvalidDataException or PeerFailedException))
    {
        Console.Error.WriteLine(ex);
    }

    return 1;
}

Report.Table(rows, "one call at a time, client process -> server process, same machine");
Report.Targets(rows);
AnsiConsole.MarkupLine($"measured in {clock.Elapsed.TotalSeconds:0} s");
if (json is not null)
{
    await Report.WriteJsonAsync(rows, json);
    AnsiConsole.MarkupLine($"wrote {Markup.Escape(json)}");
}

if (plot is not null)
{
    Report.Plot(rows, plot);
    AnsiConsole.MarkupLine($"wrote {Markup.Escape(plot)}");
}

return 0;

// --clients: the many-clients sweep, its table and JSON.
static async Task<int> SweepAsync(SweepSettings settings, string? json)
{
    AnsiConsole.MarkupLine($"[bold]OffloadRpc peer benchmark, many clients[/]: {Markup.Escape(ClientSweep.Describe(settings))}");
    var clock = System.Diagnostics.Stopwatch.StartNew();
    List<ClientsRow> rows;
    await using (var sweep = new ClientSweep(settings))
    {
        // Ctrl+C, SIGTERM or SIGHUP: every client process and server goes with us.
        using IDisposable signals = ChildProcesses.KillOnSignals(_ => sweep.Abort());
        try
        {
            rows = await sweep.RunAsync();
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            sweep.Abort(); // a failed run waits for nobody
            AnsiConsole.MarkupLine($"[red]FAILED[/] {Markup.Escape(ex.GetType().Name)}: {Markup.Escape(ex.Message)}");
            return 1;
        }
    }

    ClientsReport.Table(rows, "N client processes -> one server process per system, closed loop, one call in flight per client");
    AnsiConsole.MarkupLine($"measured in {clock.Elapsed.TotalSeconds:0} s");
    if (json is not null)
    {
        await ClientsReport.WriteJsonAsync(rows, json);
        AnsiConsole.MarkupLine($"wrote {Markup.Escape(json)}");
    }

    return 0;
}
