using System.Diagnostics;

namespace OffloadRpc.Benchmarks;

internal static class BenchmarkProcess
{
    public const string ChildVariable = "OFFLOADRPC_BENCHMARK_CHILD";

    public static Process StartSelf(IEnumerable<string> arguments)
    {
        var info = new ProcessStartInfo { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardInput = true };
        info.Environment[ChildVariable] = "1";
        string self = typeof(BenchmarkProcess).Assembly.Location;
        info.FileName = Environment.ProcessPath!;
        if (Path.GetFileName(info.FileName) is "dotnet" or "dotnet.exe")
        {
            info.ArgumentList.Add(self); // running under the dotnet host
        }

        foreach (string a in arguments)
        {
            info.ArgumentList.Add(a);
        }

        return Process.Start(info)!;
    }
}
