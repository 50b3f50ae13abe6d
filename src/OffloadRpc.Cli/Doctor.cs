using System.Diagnostics;
using System.Runtime.Intrinsics.X86;
using System.Text.Json;
using OffloadRpc.Interop;
using OffloadRpc.Transport;
using Spectre.Console;

namespace OffloadRpc.Cli;

/// <summary>Runs each check for real on this machine; nothing is assumed.</summary>
internal static class Doctor
{
    private enum Verdict
    {
        Ok,
        Note,
        Fail,
    }

    private static readonly JsonSerializerOptions s_indented = new() { WriteIndented = true };

    private sealed record Finding(string Area, string Check, Verdict Verdict, string Detail);

    public static int Run(bool asJson)
    {
        var findings = new List<Finding>();
        Add(findings, "platform", "kernel", () => (Verdict.Ok, File.ReadAllText("/proc/sys/kernel/osrelease").Trim()));
        Add(findings, "platform", ".NET", () => (Verdict.Ok, $"{Environment.Version}, {Environment.ProcessorCount} logical cores"));
        Add(findings, "cpu", "model", () => (Verdict.Ok, CpuInfoField("model name") ?? "unknown"));
        Add(findings, "cpu", "vector copy", () => (Verdict.Ok, Avx512F.IsSupported ? "AVX-512 and AVX2 (non-temporal 64-byte stores)" : Avx2.IsSupported ? "AVX2 (non-temporal 32-byte stores)" : "scalar only"));
        Add(findings, "cpu", "DSA submission", () =>
        {
            string flags = CpuInfoField("flags") ?? string.Empty;
            bool movdir64b = flags.Split(' ').Contains("movdir64b");
            bool enqcmd = flags.Split(' ').Contains("enqcmd");
            return (Verdict.Note, $"movdir64b {(movdir64b ? "yes" : "no")}, enqcmd {(enqcmd ? "yes" : "no")}");
        });
        Add(findings, "cpu", "last-level cache", () => (Verdict.Ok, $"{Engines.TransferPolicy.LastLevelCacheBytes >> 20} MiB (from sysfs; 32 MiB assumed when not reported); Auto bypasses the cache above it"));
        Add(findings, "offload", "Intel DSA", () => (Verdict.Note, Engines.DsaDetection.Describe()));
        Add(findings, "memory", "/dev/shm", () =>
        {
            var drive = new DriveInfo("/dev/shm");
            return (Verdict.Ok, $"{drive.TotalSize / (1 << 20):N0} MiB total, {drive.AvailableFreeSpace / (1 << 20):N0} MiB free (OffloadRpc itself names nothing there)");
        });
        Add(findings, "memory", "memfd + seals", () =>
        {
            SharedMemorySegment segment = SharedMemorySegment.Create(0, 1 << 20, "offloadrpc-doctor", populate: false);
            try
            {
                int seals = LinuxNative.Fcntl(segment.Descriptor, LinuxNative.F_GET_SEALS, 0);
                bool sealed_ = (seals & SharedMemorySegment.RequiredSeals) == SharedMemorySegment.RequiredSeals;
                return (sealed_ ? Verdict.Ok : Verdict.Fail, $"1 MiB memfd created and mapped, seals 0x{seals:x}{(sealed_ ? " (shrink and grow sealed)" : " — sealing does not work")}");
            }
            finally
            {
                segment.Dispose();
            }
        });
        Add(findings, "memory", "max map count", () => (Verdict.Ok, File.ReadAllText("/proc/sys/vm/max_map_count").Trim() + " mappings per process"));
        Add(findings, "limits", "open files", () => (Verdict.Ok, Limit("Max open files")));
        Add(findings, "limits", "locked memory", () => (Verdict.Ok, Limit("Max locked memory")));
        Add(findings, "ipc", "socket directory", () =>
        {
            string directory = EndpointPath.UserDirectory();
            return (Verdict.Ok, $"{directory} (mode {Convert.ToString((int)File.GetUnixFileMode(directory), 8)})");
        });
        foreach ((string name, string description) in Engines.EngineCatalog.Describe())
        {
            Add(findings, "engines", name, () => (Verdict.Ok, description));
        }

        Add(findings, "engines", "calibration", () => Engines.Calibration.Current is { } calibration
            ? (Verdict.Ok, $"measured {calibration.MeasuredAt:u}; Auto uses it ({Engines.Calibration.StorePath})")
            : (Verdict.Note, "none stored: Auto uses built-in rules; run `offloadrpc calibrate`"));
        Add(findings, "ipc", "loopback connection", () => LoopbackConnectionAsync().GetAwaiter().GetResult());

        if (asJson)
        {
            Console.WriteLine(JsonSerializer.Serialize(findings.Select(f => new { area = f.Area, check = f.Check, verdict = f.Verdict.ToString().ToLowerInvariant(), detail = f.Detail }), s_indented));
        }
        else
        {
            var table = new Table().Border(TableBorder.Rounded).Title("[bold]offloadrpc doctor[/]");
            table.AddColumn("area");
            table.AddColumn("check");
            table.AddColumn("");
            table.AddColumn("detail");
            foreach (Finding f in findings)
            {
                string mark = f.Verdict switch { Verdict.Ok => "[green]ok[/]", Verdict.Note => "[yellow]note[/]", _ => "[red]FAIL[/]" };
                table.AddRow(Markup.Escape(f.Area), Markup.Escape(f.Check), mark, Markup.Escape(f.Detail));
            }

            AnsiConsole.Write(table);
        }

        return findings.Any(f => f.Verdict == Verdict.Fail) ? 1 : 0;
    }

    private static void Add(List<Finding> findings, string area, string check, Func<(Verdict, string)> probe)
    {
        try
        {
            (Verdict verdict, string detail) = probe();
            findings.Add(new Finding(area, check, verdict, detail));
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            findings.Add(new Finding(area, check, Verdict.Fail, $"{ex.GetType().Name}: {ex.Message}"));
        }
    }

    /// <summary>A real server and client in this process: handshake, SCM_RIGHTS segment hand-over, futex wake-ups, a 4 MiB payload checked byte for byte.</summary>
    private static async Task<(Verdict, string)> LoopbackConnectionAsync()
    {
        string endpoint = $"doctor-{Environment.ProcessId}";
        await using var listener = new RpcListener(endpoint, new TransportOptions(), [], _ => new EchoHandler());
        listener.Start();
        await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None);
        byte[] payload = new byte[4 << 20];
        Random.Shared.NextBytes(payload);
        var watch = Stopwatch.StartNew();
        using RpcReply reply = await connection.CallAsync(1, "doctor"u8, [OutboundPayload.Copy(payload)]);
        watch.Stop();
        using SharedBuffer back = reply.TakePayload(0);
        bool same = back.Span.SequenceEqual(payload) && reply.Body.SequenceEqual("doctor"u8);
        return same
            ? (Verdict.Ok, $"handshake, SO_PEERCRED (uid {connection.Peer.UserId}), SCM_RIGHTS segment hand-over and a 4 MiB echo verified ({watch.Elapsed.TotalMilliseconds:0.0} ms incl. first-touch)")
            : (Verdict.Fail, "the echoed payload differs");
    }

    private sealed class EchoHandler : IRequestHandler
    {
        public ValueTask HandleAsync(IncomingCall call)
        {
            using SharedBuffer lease = call.TakePayload(0);
            call.Reply(call.Body, [OutboundPayload.Copy(lease.Memory)]);
            return ValueTask.CompletedTask;
        }
    }

    private static string? CpuInfoField(string name)
    {
        string? line = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith(name, StringComparison.Ordinal));
        return line?[(line.IndexOf(':') + 1)..].Trim();
    }

    private static string Limit(string name)
    {
        string? line = File.ReadLines("/proc/self/limits").FirstOrDefault(l => l.StartsWith(name, StringComparison.Ordinal));
        if (line is null)
        {
            return "unknown";
        }

        string[] parts = line[name.Length..].Split(' ', StringSplitOptions.RemoveEmptyEntries);
        return $"soft {parts[0]}, hard {parts[1]}{(parts.Length > 2 ? " " + parts[2] : string.Empty)}";
    }
}
