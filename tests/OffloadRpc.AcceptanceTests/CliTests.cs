using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The offloadrpc tool, run as a user would run it.</summary>
public sealed class CliTests
{
    private static async Task<(int ExitCode, string Output)> RunCliAsync(string? runtimeDirectory, params string[] arguments)
    {
        string here = AppContext.BaseDirectory.TrimEnd('/');
        string cli = Path.GetFullPath(Path.Combine(here, "..", "..", "..", "..", "..", "src", "OffloadRpc.Cli", "bin", Path.GetFileName(Path.GetDirectoryName(here))!, Path.GetFileName(here), "OffloadRpc.Cli.dll"));
        var info = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add("exec");
        info.ArgumentList.Add(cli);
        foreach (string a in arguments)
        {
            info.ArgumentList.Add(a);
        }

        if (runtimeDirectory is not null)
        {
            info.Environment["XDG_RUNTIME_DIR"] = runtimeDirectory; // keep what the tool stores out of the real per-user directory
        }

        using Process process = Process.Start(info)!;
        Task<string> output = process.StandardOutput.ReadToEndAsync();
        Task<string> errors = process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(3));
        return (process.ExitCode, await output + await errors);
    }

    [Fact]
    public async Task Calibrate_measures_every_mode_stores_the_result_and_doctor_reports_it()
    {
        string runtime = Directory.CreateTempSubdirectory("offloadrpc-xdg-").FullName;
        try
        {
            (int exit, string output) = await RunCliAsync(runtime, "calibrate", "--quick");
            Assert.True(exit == 0, output);
            Assert.Contains("256 MiB", output);
            Assert.Contains("stored in", output);

            string stored = Assert.Single(Directory.GetFiles(Path.Combine(runtime, "offloadrpc"), "calibration-*.json"));
            using (JsonDocument calibration = JsonDocument.Parse(await File.ReadAllTextAsync(stored)))
            {
                Assert.Equal(7, calibration.RootElement.GetProperty("points").GetArrayLength());
                Assert.All(calibration.RootElement.GetProperty("points").EnumerateArray(), p => Assert.True(p.GetProperty("copy_inject_gbps").GetDouble() > 0));
            }

            (int doctorExit, string doctor) = await RunCliAsync(runtime, "doctor", "--json");
            Assert.Equal(0, doctorExit);
            Assert.Contains("Auto uses it", doctor);
        }
        finally
        {
            Directory.Delete(runtime, recursive: true);
        }
    }

    [Fact]
    public async Task Bench_measures_every_mode_and_size_with_the_floors_and_writes_json_and_a_plot()
    {
        string directory = Directory.CreateTempSubdirectory("offloadrpc-bench-").FullName;
        try
        {
            string json = Path.Combine(directory, "bench.json");
            string png = Path.Combine(directory, "bench.png");
            (int exit, string output) = await RunCliAsync(directory, "bench", "--quick", "--json", json, "--plot", png);
            Assert.True(exit == 0, output);

            using JsonDocument document = JsonDocument.Parse(await File.ReadAllTextAsync(json));
            JsonElement[] rows = document.RootElement.EnumerateArray().ToArray();
            Assert.Contains(rows, r => r.GetProperty("mode").GetString() == "floor-pingpong" && r.GetProperty("p50_us").GetDouble() > 0);
            foreach (long size in new long[] { 64, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20 })
            {
                Assert.Contains(rows, r => r.GetProperty("mode").GetString() == "floor-memcpy" && r.GetProperty("bytes").GetInt64() == size);
                Assert.Contains(rows, r => r.GetProperty("mode").GetString() == "pipelined" && r.GetProperty("bytes").GetInt64() == size && r.GetProperty("first_chunk_us").GetDouble() > 0);
                foreach (string mode in new[] { "copy", "offload", "hybrid", "pipelined", "auto" })
                {
                    JsonElement row = Assert.Single(rows, r => r.GetProperty("mode").GetString() == mode && r.GetProperty("bytes").GetInt64() == size && (mode == "auto" || r.GetProperty("cache").GetString() == "inject"));
                    double p50 = row.GetProperty("p50_us").GetDouble();
                    Assert.True(p50 > 0, $"{mode} {size}: p50 {p50}");
                    Assert.True(row.GetProperty("p99_us").GetDouble() >= p50);
                    // GB/s is the payload over the median: a row whose figures disagree was computed wrongly.
                    Assert.Equal(size / (p50 / 1e6) / 1e9, row.GetProperty("gbps").GetDouble(), 1e-9 * Math.Max(1, row.GetProperty("gbps").GetDouble()));
                    double cpu = row.GetProperty("caller_cpu_us").GetDouble();
                    Assert.True(double.IsFinite(cpu) && cpu >= 0, $"{mode} {size}: caller CPU {cpu}");
                }
            }

            byte[] header = (await File.ReadAllBytesAsync(png))[..8];
            Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, header);
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>
    /// <c>bench --clients 1,2 --idle-clients 3</c> with short windows: one server, one and then two
    /// client processes, and three idle ones. The machine is shared, so no figure is judged by its
    /// size: only that every figure is there and that the figures agree with each other.
    /// </summary>
    [Fact]
    public async Task Bench_with_clients_measures_every_client_process_and_the_server_and_writes_json()
    {
        string directory = Directory.CreateTempSubdirectory("offloadrpc-bench-clients-").FullName;
        try
        {
            string json = Path.Combine(directory, "clients.json");
            var clock = Stopwatch.StartNew();
            (int exit, string output) = await RunCliAsync(directory, "bench", "--clients", "1,2", "--idle-clients", "3", "--window-ms", "500", "--warmup-ms", "300", "--json", json);
            Assert.True(exit == 0, output);
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"took {clock.Elapsed}");
            Assert.Contains("server threads by name", output);

            using JsonDocument document = JsonDocument.Parse(await File.ReadAllTextAsync(json));
            JsonElement[] rows = document.RootElement.EnumerateArray().ToArray();
            Assert.Equal(5, rows.Length);
            foreach (int clients in new[] { 1, 2 })
            {
                foreach ((string op, long bytes) in new[] { ("small", 64L), ("checksum", 1L << 20) })
                {
                    JsonElement row = Assert.Single(rows, r => r.GetProperty("clients").GetInt32() == clients && r.GetProperty("op").GetString() == op);
                    ClientsRowChecks.Check(row, clients, bytes);
                }
            }

            foreach (string op in new[] { "small", "checksum" })
            {
                ClientsRowChecks.CheckRatio(rows.Where(r => r.GetProperty("op").GetString() == op).ToArray());
            }

            JsonElement idle = Assert.Single(rows, r => r.GetProperty("op").GetString() == "idle");
            Assert.Equal(3, idle.GetProperty("clients").GetInt32());
            Assert.Equal(3, idle.GetProperty("processes").GetInt32());
            Assert.True(idle.GetProperty("server_cpu_pct").GetDouble() >= 0);
            Assert.True(idle.GetProperty("server_threads").GetInt32() > 0);
            int named = idle.GetProperty("server_thread_names").EnumerateObject().Sum(n => n.Value.GetInt32());
            Assert.InRange(named, 1, idle.GetProperty("server_threads").GetInt32() + 3); // counted at other instants: a thread-pool thread may come or go
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Fact]
    public async Task Bench_with_clients_refuses_a_bad_list_before_starting_anything()
    {
        (int exit, string output) = await RunCliAsync(null, "bench", "--clients", "1,0");
        Assert.Equal(2, exit);
        Assert.Contains("--clients takes", output);
        (exit, output) = await RunCliAsync(null, "bench", "--idle-processes", "2");
        Assert.Equal(2, exit); // not a plain bench run of minutes
        Assert.Contains("--idle-processes", output);
    }

    [Fact]
    public async Task Doctor_checks_every_mechanism_for_real_and_reports_them_as_json()
    {
        (int exitCode, string output) = await RunCliAsync(null, "doctor", "--json");

        using JsonDocument document = JsonDocument.Parse(output);
        var findings = document.RootElement.EnumerateArray().ToDictionary(f => f.GetProperty("check").GetString()!, f => (Verdict: f.GetProperty("verdict").GetString(), Detail: f.GetProperty("detail").GetString()));
        Assert.Equal("ok", findings["memfd + seals"].Verdict);
        Assert.Equal("ok", findings["loopback connection"].Verdict);
        Assert.Contains("4 MiB echo verified", findings["loopback connection"].Detail);
        Assert.Equal("note", findings["Intel DSA"].Verdict);
        Assert.StartsWith("absent: ", findings["Intel DSA"].Detail);
        Assert.DoesNotContain("dsa", findings.Keys); // detection only: no engine entry that cannot run
        Assert.DoesNotContain(findings.Values, f => f.Verdict == "fail");
        Assert.Equal(0, exitCode);
        Assert.Contains("inline on the calling thread", findings["cpu"].Detail);
        Assert.Contains("dedicated copy thread", findings["worker"].Detail);
    }
}
