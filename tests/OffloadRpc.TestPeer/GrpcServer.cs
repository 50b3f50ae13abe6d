using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using OffloadRpc.TestContracts;

/// <summary>
/// The typed services and the call probe in an ASP.NET Core app that serves them both ways: over shared
/// memory on <c>endpoint</c> (AddOffloadRpcServer) and over gRPC (h2c) on 127.0.0.1 with a port the
/// system picks and on a Unix socket beside the shared-memory one (MapOffloadRpcGrpc). Prints READY, the
/// socket path, the gRPC address and the gRPC Unix socket's path. With --traces, the
/// spans and server metrics of OffloadRpc are recorded for <see cref="ICallProbe.ServerLogAsync"/>; with
/// --max-message-bytes N, its OffloadRpcOptions.MaxMessageBytes is N; with --no-advertise, its
/// OffloadRpcOptions.AdvertiseSharedMemory is false; with --max-mappings N, buffers may add at most N
/// memory mappings to those the started server holds; with --max-buffered-request-bytes N, its
/// OffloadRpcOptions.MaxBufferedRequestBytes is N; with --tls PFX, the TCP listener is HTTPS with the
/// certificate (and key) in the PKCS #12 file PFX; with --token T, every gRPC method (Describe too) needs
/// the header "Authorization: Bearer T" (ASP.NET Core authentication and RequireAuthorization with a
/// policy): "Bearer T-readonly" authenticates but lacks the policy's role (403, PermissionDenied); and each
/// call's authenticated caller is logged for ServerLogAsync (<see cref="CallerInterceptor"/>).
/// </summary>
internal static class GrpcServer
{
    public static async Task<int> RunAsync(string endpoint, string[] args)
    {
        using System.Diagnostics.ActivityListener? spans = args.Contains("--traces") ? ProbeServer.ListenToSpans() : null;
        using System.Diagnostics.Metrics.MeterListener? metrics = args.Contains("--traces") ? ProbeServer.ListenToMetrics() : null;
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        string socket = OffloadRpc.Transport.EndpointPath.Resolve(endpoint);
        string grpcSocket = socket + ".grpc";
        int tls = Array.IndexOf(args, "--tls");
        System.Security.Cryptography.X509Certificates.X509Certificate2? certificate = tls >= 0 ? System.Security.Cryptography.X509Certificates.X509CertificateLoader.LoadPkcs12FromFile(args[tls + 1], null) : null;
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.Listen(System.Net.IPAddress.Loopback, 0, listen =>
            {
                listen.Protocols = HttpProtocols.Http2;
                if (certificate is not null)
                {
                    listen.UseHttps(certificate);
                }
            });
            kestrel.ListenUnixSocket(grpcSocket, listen => listen.Protocols = HttpProtocols.Http2);
        });
        int token = Array.IndexOf(args, "--token");
        if (token >= 0)
        {
            builder.Services.AddHttpContextAccessor(); // the calls' ASP.NET Core identity, for CallerInterceptor
            builder.Services.AddAuthentication(BearerToken.SchemeName).AddScheme<BearerToken.TokenOptions, BearerToken>(BearerToken.SchemeName, o => o.Token = args[token + 1]);
            builder.Services.AddAuthorization(o => o.AddPolicy("callers", policy => policy.RequireClaim("role", "caller")));
        }

        builder.Services.AddScoped<ProbeDependency>();
        int index = Array.IndexOf(args, "--max-message-bytes");
        int? maxMessageBytes = index >= 0 ? int.Parse(args[index + 1], System.Globalization.CultureInfo.InvariantCulture) : null;
        int buffered = Array.IndexOf(args, "--max-buffered-request-bytes");
        OffloadRpc.Hosting.OffloadRpcServerBuilder server = builder.Services.AddOffloadRpcServer(endpoint, o =>
            {
                o.DispatchToThreadPool = true;
                o.MaxMessageBytes = maxMessageBytes ?? o.MaxMessageBytes;
                o.AdvertiseSharedMemory = !args.Contains("--no-advertise");
                o.MaxBufferedRequestBytes = buffered >= 0 ? long.Parse(args[buffered + 1], System.Globalization.CultureInfo.InvariantCulture) : o.MaxBufferedRequestBytes;
            })
            .AddService<IImageService, ImageService>(ServiceLifetime.Singleton)
            .AddService<IKitchenSink, KitchenSink>(ServiceLifetime.Singleton)
            .AddService<IFrameSource, FrameSource>(ServiceLifetime.Singleton)
            .AddService<ICallProbe, CallProbe>()
            .AddService<IUploadProbe, CallProbe>()
            .AddService<AotPing.IPing, AotPing.Ping>(ServiceLifetime.Singleton)
            .AddInterceptor<ProbeServerInterceptor>();
        if (token >= 0)
        {
            server.AddInterceptor<CallerInterceptor>(); // logs whom ASP.NET Core authenticated, per call
        }

        await using WebApplication app = builder.Build();
        if (token >= 0)
        {
            app.UseAuthentication();
            app.UseAuthorization();
            app.MapOffloadRpcGrpc().RequireAuthorization("callers"); // as an application would: every method, Describe too
        }
        else
        {
            app.MapOffloadRpcGrpc();
        }

        await app.StartAsync();
        int mappings = Array.IndexOf(args, "--max-mappings");
        if (mappings >= 0)
        {
            // The most mappings buffers may add from here (the backstop a hostile peer meets): a test sets it low.
            OffloadRpc.Transport.LocalLeases.MaxLiveMappings = OffloadRpc.Transport.SharedMemorySegment.LiveSegments + int.Parse(args[mappings + 1], System.Globalization.CultureInfo.InvariantCulture);
        }

        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First(a => a.StartsWith(certificate is null ? "http://127.0.0.1:" : "https://127.0.0.1:", StringComparison.Ordinal));
        Console.WriteLine($"READY {socket} {address} {grpcSocket}");
        await Task.Run(() => Console.In.ReadToEnd());
        await app.StopAsync();
        File.Delete(grpcSocket);
        return 0;
    }
}

/// <summary>The simplest bearer-token authentication: the request's token is the one the server was started with, or the caller is anonymous.</summary>
internal sealed class BearerToken(Microsoft.Extensions.Options.IOptionsMonitor<BearerToken.TokenOptions> options, ILoggerFactory logger, System.Text.Encodings.Web.UrlEncoder encoder)
    : Microsoft.AspNetCore.Authentication.AuthenticationHandler<BearerToken.TokenOptions>(options, logger, encoder)
{
    public const string SchemeName = "Bearer";

    protected override Task<Microsoft.AspNetCore.Authentication.AuthenticateResult> HandleAuthenticateAsync()
    {
        string? header = Request.Headers.Authorization;
        if (header is null || !header.StartsWith("Bearer ", StringComparison.Ordinal))
        {
            return Task.FromResult(Microsoft.AspNetCore.Authentication.AuthenticateResult.NoResult());
        }

        string presented = header[7..];
        bool caller = Same(presented, Options.Token);
        if (!caller && !Same(presented, Options.Token + "-readonly"))
        {
            return Task.FromResult(Microsoft.AspNetCore.Authentication.AuthenticateResult.Fail("Unknown token."));
        }

        // The token, or its read-only variant: the same caller, but only the first has the role the policy asks for.
        System.Security.Claims.Claim[] claims = caller
            ? [new(System.Security.Claims.ClaimTypes.Name, "caller"), new("role", "caller")]
            : [new(System.Security.Claims.ClaimTypes.Name, "reader")];
        var identity = new System.Security.Claims.ClaimsIdentity(claims, SchemeName);
        return Task.FromResult(Microsoft.AspNetCore.Authentication.AuthenticateResult.Success(new Microsoft.AspNetCore.Authentication.AuthenticationTicket(new System.Security.Claims.ClaimsPrincipal(identity), SchemeName)));
    }

    private static bool Same(string a, string b) =>
        System.Security.Cryptography.CryptographicOperations.FixedTimeEquals(System.Text.Encoding.UTF8.GetBytes(a), System.Text.Encoding.UTF8.GetBytes(b));

    internal sealed class TokenOptions : Microsoft.AspNetCore.Authentication.AuthenticationSchemeOptions
    {
        public string Token { get; set; } = string.Empty;
    }
}

/// <summary>
/// Logs, for each call, who ASP.NET Core authenticated: "caller {method} {name}" (the principal's name, "anonymous"
/// without authentication, "none" without an HTTP request: a shared-memory call). What an implementation or an
/// interceptor sees of the caller's identity over gRPC, through <see cref="Microsoft.AspNetCore.Http.IHttpContextAccessor"/>.
/// </summary>
internal sealed class CallerInterceptor(Microsoft.AspNetCore.Http.IHttpContextAccessor http) : OffloadRpc.ServerInterceptor
{
    public override ValueTask<TResult> InterceptAsync<TResult>(OffloadRpc.ServerInterceptorContext context, OffloadRpc.ServerCallContinuation<TResult> continuation)
    {
        string who = http.HttpContext is { } request ? request.User.Identity?.Name ?? "anonymous" : "none";
        ProbeLog.Add($"caller {context.MethodName} {who}");
        return continuation(context);
    }
}
