using System.IO.Compression;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>One `dotnet pack` of the runtime gives a package with the generator and the analyzers beside it.</summary>
public sealed class PackageTests
{
    [Fact]
    public async Task The_package_carries_the_runtime_the_generator_the_analyzers_and_the_code_fixes()
    {
        string repository = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));
        string output = Directory.CreateTempSubdirectory("offloadrpc-pack-").FullName;
        try
        {
            (int exit, string log) = await ProcessRunner.RunAsync(
                Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet",
                ["pack", Path.Combine(repository, "src", "OffloadRpc", "OffloadRpc.csproj"), "-c", "Release", "-o", output, "-nologo"],
                TimeSpan.FromMinutes(5));
            Assert.True(exit == 0, log);

            string package = Assert.Single(Directory.GetFiles(output, "OffloadRpc.*.nupkg"));
            using ZipArchive zip = ZipFile.OpenRead(package);
            string[] entries = zip.Entries.Select(e => e.FullName).ToArray();
            Assert.Contains("lib/net10.0/OffloadRpc.dll", entries);
            Assert.Contains("analyzers/dotnet/cs/OffloadRpc.Generators.dll", entries);
            Assert.Contains("analyzers/dotnet/cs/OffloadRpc.Analyzers.dll", entries);
            Assert.Contains("analyzers/dotnet/cs/OffloadRpc.CodeFixes.dll", entries);
            Assert.DoesNotContain(entries, e => e.StartsWith("lib/", StringComparison.Ordinal) && e.Contains("Generators", StringComparison.Ordinal));
        }
        finally
        {
            Directory.Delete(output, recursive: true);
        }
    }

    /// <summary>README's quickstart installs, with `dotnet add package`, the packages the projects pack as.</summary>
    [Fact]
    public void The_readme_quickstart_adds_the_packages_by_the_ids_they_are_packed_as()
    {
        string repository = Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "..", "..", "..", "..", ".."));
        string readme = File.ReadAllText(Path.Combine(repository, "README.md"));
        int start = readme.IndexOf("\n### Quickstart\n", StringComparison.Ordinal);
        Assert.True(start >= 0, "README has a Quickstart");
        string quickstart = readme[start..readme.IndexOf("\n## ", start, StringComparison.Ordinal)];
        foreach ((string id, string project) in new[] { ("OffloadRpc", "src/OffloadRpc/OffloadRpc.csproj"), ("OffloadRpc.Hosting", "src/OffloadRpc.Hosting/OffloadRpc.Hosting.csproj") })
        {
            Assert.Contains($"<PackageId>{id}</PackageId>", File.ReadAllText(Path.Combine(repository, project)), StringComparison.Ordinal);
            Assert.Matches($@"(?m)^dotnet add package {System.Text.RegularExpressions.Regex.Escape(id)}(\s|$)", quickstart);
        }
    }
}
